"""MMMU (Yue et al., 2024): college-level multimodal questions; a general-ability benchmark of the paper.

Parquet rows (`MMMU/MMMU`, one folder per subject): question, options (a list or its Python literal), answer,
question_type, image_1 … image_7. Inline "<image k>" references become placeholders in reading order (options
included), each followed by its image.
"""

import ast
import re

from cpt_jax.data.tasks import base

_IMAGE_REFERENCE = re.compile(r"<image (\d+)>")


class CptMmmu(base.TaskBuilder):
    """MMMU; multiple-choice answers are letters, open ones short text."""

    name = "cpt_mmmu"
    HOMEPAGE = "https://mmmu-benchmark.github.io"

    def from_row(self, row, example_id):
        options = row.get("options") or []
        if isinstance(options, str):
            try:
                options = ast.literal_eval(options)
            except (ValueError, SyntaxError):
                raise base.Skip("unsupported", f"options {options[:80]!r} are not a list literal",
                                "store options as a list of strings") from None
        text = base.field(row, "question")
        answer = base.field(row, "answer")
        if options:
            text = f"{text}\n{base.lettered(options)}\n{base.LETTER_SUFFIX}"
            answer = base.option_letter(answer, len(options))
        else:
            text = f"{text}\n{base.SHORT_ANSWER_SUFFIX}"
        images = [base.image_ref(base.field(row, f"image_{k}"), f"image_{k}")
                  for k in _IMAGE_REFERENCE.findall(text)]
        return base.Example(example_id, _IMAGE_REFERENCE.sub(base.IMAGE_PLACEHOLDER, text), answer, images)
