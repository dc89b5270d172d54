"""Verifiable rewards: score decoded responses against ground-truth answers on the host.

A reward function maps `(predictions, ground_truths)` to one dict per pair with float entries
"overall" (the RL training signal), "format" and "accuracy", each in [0, 1]. Functions live in a registry and are
selected by name from the config:

  math             the paper's reward, identical to EasyR1's `examples/reward_function/math.py` `compute_score`:
                   a <think>...</think> block then \\boxed{answer}, graded with `mathruler`.
  no_cot           the paper's no-CoT ablation (the same file's `no_cot`): the whole stripped response is graded.
  exact_match      normalised string equality of the extracted answer, for free-form VQA answers.
  multiple_choice  the extracted option letter A-J against the ground-truth letter.

Every function first removes whitespace around "<", ">" and "/" in the response, as the official code does (Qwen
models sometimes write "< think >"); this also joins "1 / 2" into "1/2". Ground truths are used as given.
"""

import re
from collections.abc import Callable, Iterator, Sequence

from mathruler.grader import extract_boxed_content, grade_answer

RewardFn = Callable[[Sequence[str], Sequence[str]], list[dict[str, float]]]

REWARDS: dict[str, RewardFn] = {}

# Weight of the format score in "overall" for the CoT rewards: overall = (1 - w) * accuracy + w * format.
FORMAT_WEIGHT = 0.1

_TAG_SPACE = re.compile(r"\s*(<|>|/)\s*")
_COT_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
_THINK_END = "</think>"
_BOXED = "\\boxed{"
_WHITESPACE = re.compile(r"\s+")
_TEXT_WRAPPER = re.compile(r"^\\text\{(.*)\}$", re.DOTALL)
# A bare option letter, optionally in parentheses and/or followed by ".", ":" or ")" and the option's text.
_CHOICE = re.compile(r"\(?([A-J])\)?(?:[.:)](?:\s.*)?)?", re.DOTALL)


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward function to `REWARDS` under `name`."""

    def register(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(
                f"reward {name!r} is already registered (by {REWARDS[name].__qualname__}); pick another name"
            )
        REWARDS[name] = fn
        return fn

    return register


def get_reward_fn(name: str) -> RewardFn:
    """Returns the registered reward function `name`."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}") from None


def _pairs(predictions: Sequence[str], ground_truths: Sequence[str]) -> Iterator[tuple[str, str]]:
    """Yields (tag-normalised prediction, ground truth); unlike the official `zip`, never drops unpaired items."""
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(ground_truths)} ground truths; pass one ground truth per "
            "prediction (repeat a prompt's answer for each of its samples)"
        )
    for prediction, ground_truth in zip(predictions, ground_truths):
        yield _TAG_SPACE.sub(r"\1", prediction), ground_truth


def _score(accuracy: bool, format_ok: bool, format_weight: float) -> dict[str, float]:
    accuracy, format_score = float(accuracy), float(format_ok)
    return {
        "overall": (1 - format_weight) * accuracy + format_weight * format_score,
        "format": format_score,
        "accuracy": accuracy,
    }


def cot_format_ok(prediction: str) -> bool:
    """Whether a (tag-normalised) response is a <think>...</think> block followed by a \\boxed{} answer."""
    return _COT_FORMAT.fullmatch(prediction) is not None


@register_reward("math")
def math_reward(
    predictions: Sequence[str], ground_truths: Sequence[str], format_weight: float = FORMAT_WEIGHT
) -> list[dict[str, float]]:
    """The paper's reward: accuracy of the last \\boxed{} content under `mathruler.grader.grade_answer`, plus format.

    As in the official code a response without a complete \\boxed{} is graded as the string "None" (so it scores
    accuracy 1 against a ground truth "none"), and the format check only needs the tags in order, not a balanced box.
    """
    return [
        _score(grade_answer(extract_boxed_content(prediction), ground_truth), cot_format_ok(prediction), format_weight)
        for prediction, ground_truth in _pairs(predictions, ground_truths)
    ]


@register_reward("no_cot")
def no_cot_reward(predictions: Sequence[str], ground_truths: Sequence[str]) -> list[dict[str, float]]:
    """The no-CoT ablation: overall = accuracy = `grade_answer` of the whole stripped response.

    "format" is a diagnostic that never enters "overall" (the official code reports a constant 0): 1 when the
    response is a direct answer as the no-CoT prompt asks, i.e. non-empty, on a single line and without <think>.
    """
    scores = []
    for prediction, ground_truth in _pairs(predictions, ground_truths):
        answer = prediction.strip()
        direct = bool(answer) and "\n" not in answer and "<think>" not in answer
        scores.append(_score(grade_answer(answer, ground_truth.strip()), direct, format_weight=0.0))
    return scores


def _last_boxed(text: str) -> str | None:
    """Stripped content of the last \\boxed{...}; None if there is none or its braces never close."""
    start = text.rfind(_BOXED)
    if start == -1:
        return None
    body_start = start + len(_BOXED)
    depth = 0
    for i in range(body_start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[body_start:i].strip()
            depth -= 1
    return None


def extract_answer(prediction: str) -> str:
    """The final answer of a response: the last closed \\boxed{} content after the last </think>, else that text.

    A response without </think> is searched whole.
    """
    tail = prediction.rpartition(_THINK_END)[2]
    boxed = _last_boxed(tail)
    return tail.strip() if boxed is None else boxed


def normalize_text(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace and no trailing periods."""
    return _WHITESPACE.sub(" ", text).strip().lower().rstrip(".").rstrip()


def extract_choice(answer: str) -> str | None:
    """The option letter A-J of an answer such as "B", "(B)", "B.", "B) text", "\\text{B}"; None if there is none."""
    answer = answer.strip()
    wrapped = _TEXT_WRAPPER.fullmatch(answer)
    if wrapped:
        answer = wrapped.group(1).strip()
    match = _CHOICE.fullmatch(answer)
    return match.group(1) if match else None


@register_reward("exact_match")
def exact_match_reward(
    predictions: Sequence[str], ground_truths: Sequence[str], format_weight: float = FORMAT_WEIGHT
) -> list[dict[str, float]]:
    """`normalize_text` equality of `extract_answer(prediction)` and the ground truth; format as in "math"."""
    return [
        _score(
            normalize_text(extract_answer(prediction)) == normalize_text(ground_truth),
            cot_format_ok(prediction),
            format_weight,
        )
        for prediction, ground_truth in _pairs(predictions, ground_truths)
    ]


@register_reward("multiple_choice")
def multiple_choice_reward(
    predictions: Sequence[str], ground_truths: Sequence[str], format_weight: float = FORMAT_WEIGHT
) -> list[dict[str, float]]:
    """The option letter of `extract_answer(prediction)` against the ground-truth letter; format as in "math"."""
    scores = []
    for prediction, ground_truth in _pairs(predictions, ground_truths):
        expected = extract_choice(ground_truth)
        if expected is None:
            raise ValueError(
                f"multiple-choice ground truth {ground_truth!r} is not an option letter A-J; use the 'exact_match' "
                "or 'math' reward for free-form answers"
            )
        predicted = extract_choice(extract_answer(prediction))
        scores.append(_score(predicted == expected, cot_format_ok(prediction), format_weight))
    return scores
