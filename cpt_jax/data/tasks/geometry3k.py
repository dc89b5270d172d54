"""Geometry3K (Lu et al., 2021): geometry problems over a diagram, numeric or expression answers.

Parquet rows (`hiyouga/geometry3k`): images (list), problem (with "<image>" placeholders), answer.
"""

from cpt_jax.data.tasks import base


class CptGeometry3k(base.TaskBuilder):
    """Geometry3K, fifth task of the paper's sequence (10 epochs there)."""

    name = "cpt_geometry3k"
    HOMEPAGE = "https://lupantech.github.io/inter-gps"

    def from_row(self, row, example_id):
        images = [base.image_ref(image) for image in base.field(row, "images")]
        question = base.with_placeholders(base.field(row, "problem"), len(images))
        return base.Example(example_id, question, base.field(row, "answer"), images)
