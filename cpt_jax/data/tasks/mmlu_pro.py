"""MMLU-Pro (Wang et al., 2024): text-only multiple choice with up to ten options (A–J); general ability.

Parquet rows (`TIGER-Lab/MMLU-Pro`): question, options, answer (letter) or answer_index.
"""

from cpt_jax.data.tasks import base


class CptMmluPro(base.TaskBuilder):
    """MMLU-Pro; no images, answers are option letters A–J."""

    name = "cpt_mmlu_pro"
    HOMEPAGE = "https://github.com/TIGER-AI-Lab/MMLU-Pro"
    ID_FIELDS = ("question_id", "id")

    def from_row(self, row, example_id):
        options = base.field(row, "options")
        question = f"{base.field(row, 'question')}\n{base.lettered(options)}\n{base.LETTER_SUFFIX}"
        answer = row.get("answer") if row.get("answer") is not None else base.field(row, "answer_index")
        return base.Example(example_id, question, base.option_letter(answer, len(options)), [])
