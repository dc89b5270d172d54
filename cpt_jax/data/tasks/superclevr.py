"""Super-CLEVR (Li et al., 2023): counting and attribute questions over rendered vehicles.

Parquet exports differ in naming; a row has `image` or `images`, `question` or `problem`, and `answer` or
`solution` (an "<answer>…</answer>" span in the solution is the answer).
"""

import re

from cpt_jax.data.tasks import base

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class CptSuperclevr(base.TaskBuilder):
    """Super-CLEVR, last task of the paper's sequence (3 epochs there)."""

    name = "cpt_superclevr"
    HOMEPAGE = "https://github.com/Lizw14/Super-CLEVR"
    ID_FIELDS = ("id", "question_id")

    def from_row(self, row, example_id):
        if row.get("images") is not None:
            images = [base.image_ref(image) for image in row["images"]]
        else:
            images = [base.image_ref(base.field(row, "image"))]
        text = base.first_field(row, ("question", "problem"))
        question = base.with_placeholders(f"{text}\n{base.SHORT_ANSWER_SUFFIX}", len(images))
        answer = str(base.first_field(row, ("answer", "solution")))
        tagged = _ANSWER_TAG.search(answer)
        return base.Example(example_id, question, tagged.group(1) if tagged else answer, images)
