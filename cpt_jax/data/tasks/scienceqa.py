"""ScienceQA (Lu et al., 2022): science multiple choice; the paper keeps the questions with an image (-IMG).

Parquet rows (`derek-thomas/ScienceQA`): image, question, choices, answer (0-based index), hint.
"""

from cpt_jax.data.tasks import base


class CptScienceqa(base.TaskBuilder):
    """ScienceQA-IMG, first task of the paper's sequence; answers are option letters."""

    name = "cpt_scienceqa"
    HOMEPAGE = "https://scienceqa.github.io"

    def from_row(self, row, example_id):
        if row.get("image") is None:
            return None
        choices = base.field(row, "choices")
        lines = [row.get("hint") or "", base.field(row, "question"), base.lettered(choices), base.LETTER_SUFFIX]
        question = "\n".join(line for line in lines if line)
        answer = base.option_letter(base.field(row, "answer"), len(choices))
        image = base.image_ref(row["image"])
        return base.Example(example_id, f"{base.IMAGE_PLACEHOLDER}\n{question}", answer, [image])
