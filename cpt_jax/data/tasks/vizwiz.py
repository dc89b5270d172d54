"""VizWiz-VQA (Gurari et al., 2018): questions from blind users about their own photos, often unanswerable.

Parquet rows (`lmms-lab/VizWiz-VQA`): image, question, answers (strings or {"answer": …} dicts). The reference
answer is the annotators' most frequent one.
"""

from cpt_jax.data.tasks import base

_SUFFIX = (
    f"When the provided information is insufficient, respond with 'Unanswerable'.\n{base.SHORT_ANSWER_SUFFIX}"
)


class CptVizwiz(base.TaskBuilder):
    """VizWiz-VQA, third task of the paper's sequence."""

    name = "cpt_vizwiz"
    HOMEPAGE = "https://vizwiz.org"
    ID_FIELDS = ("question_id", "id")

    def from_row(self, row, example_id):
        question = f"{base.IMAGE_PLACEHOLDER}\n{base.field(row, 'question')}\n{_SUFFIX}"
        answer = base.majority(base.field(row, "answers"))
        return base.Example(example_id, question, answer, [base.image_ref(base.field(row, "image"))])
