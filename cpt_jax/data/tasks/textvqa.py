"""TextVQA (Singh et al., 2019): questions that need reading text in the image, with OCR tokens as a hint.

Parquet rows (`facebook/textvqa`, `lmms-lab/textvqa`): image, question, answers (ten annotators), ocr_tokens.
The reference answer is the annotators' most frequent one.
"""

from cpt_jax.data.tasks import base


class CptTextvqa(base.TaskBuilder):
    """TextVQA, second task of the paper's sequence."""

    name = "cpt_textvqa"
    HOMEPAGE = "https://textvqa.org"
    ID_FIELDS = ("question_id", "id")

    def from_row(self, row, example_id):
        ocr_tokens = ",".join(row.get("ocr_tokens") or [])
        question = (f"{base.IMAGE_PLACEHOLDER}\n{base.field(row, 'question')}\nReference OCR token:{ocr_tokens}\n"
                    f"{base.SHORT_ANSWER_SUFFIX}")
        answer = base.majority(base.field(row, "answers"))
        return base.Example(example_id, question, answer, [base.image_ref(base.field(row, "image"))])
