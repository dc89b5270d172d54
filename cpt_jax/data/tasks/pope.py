"""POPE (Li et al., 2023): yes/no object-existence questions that probe hallucination; general ability.

Parquet rows (`lmms-lab/POPE`): image, question, answer ("yes"/"no").
"""

from cpt_jax.data.tasks import base


class CptPope(base.TaskBuilder):
    """POPE; answers are "yes" or "no"."""

    name = "cpt_pope"
    HOMEPAGE = "https://github.com/RUCAIBox/POPE"
    ID_FIELDS = ("question_id", "id")

    def from_row(self, row, example_id):
        question = f"{base.IMAGE_PLACEHOLDER}\n{base.field(row, 'question')}\n{base.SHORT_ANSWER_SUFFIX}"
        image = base.image_ref(base.field(row, "image"))
        return base.Example(example_id, question, base.field(row, "answer"), [image])
