"""PathVQA (He et al., 2020): questions about pathology images, open-ended and yes/no.

Parquet rows (`flaviagiammarino/path-vqa`): image, question, answer.
"""

from cpt_jax.data.tasks import base


class CptPathvqa(base.TaskBuilder):
    """PathVQA, sixth task of the paper's sequence."""

    name = "cpt_pathvqa"
    HOMEPAGE = "https://github.com/UCSD-AI4H/PathVQA"

    def from_row(self, row, example_id):
        question = f"{base.IMAGE_PLACEHOLDER}{base.field(row, 'question')}\n{base.SHORT_ANSWER_SUFFIX}"
        image = base.image_ref(base.field(row, "image"))
        return base.Example(example_id, question, base.field(row, "answer"), [image])
