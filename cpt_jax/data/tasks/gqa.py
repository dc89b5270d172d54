"""GQA (Hudson & Manning, 2019): compositional questions about real-world scenes.

Parquet rows: question, answer, and either the image itself or an `imageId` whose file is
`images/<imageId>.jpg` under the manual dir (the layout of `lmms-lab/GQA`, which ships images separately).
"""

from cpt_jax.data.tasks import base


class CptGqa(base.TaskBuilder):
    """GQA, fourth task of the paper's sequence."""

    name = "cpt_gqa"
    HOMEPAGE = "https://cs.stanford.edu/people/dorarad/gqa"
    ID_FIELDS = ("id", "question_id")

    def from_row(self, row, example_id):
        if row.get("image") is not None:
            image = base.image_ref(row["image"])
        else:
            image = f"images/{base.field(row, 'imageId')}.jpg"
        question = f"{base.IMAGE_PLACEHOLDER}\n{base.field(row, 'question')}\n{base.SHORT_ANSWER_SUFFIX}"
        return base.Example(example_id, question, base.field(row, "answer"), [image])
