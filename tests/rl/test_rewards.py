import re

import pytest
from mathruler.grader import extract_boxed_content, grade_answer

from cpt_jax.rl import rewards
from cpt_jax.rl.rewards import extract_answer, extract_choice, get_reward_fn, normalize_text, register_reward


# Reference: the paper's reward as EasyR1 v0.3.0 `examples/reward_function/math.py` computes it (`compute_score`
# and `no_cot`), transcribed statement by statement; the library must agree with it on every case.
def _reference_compute_score(predicts, ground_truths, format_weight=0.1):
    scores = []
    for predict, ground_truth in zip(predicts, ground_truths):
        predict = re.sub(r"\s*(<|>|/)\s*", r"\1", predict)
        format_match = re.fullmatch(re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL), predict)
        format_score = 1.0 if format_match else 0.0
        accuracy_score = 1.0 if grade_answer(extract_boxed_content(predict), ground_truth) else 0.0
        scores.append(
            {
                "overall": (1 - format_weight) * accuracy_score + format_weight * format_score,
                "format": format_score,
                "accuracy": accuracy_score,
            }
        )
    return scores


def _reference_no_cot(predicts, ground_truths):
    scores = []
    for predict, ground_truth in zip(predicts, ground_truths):
        predict = re.sub(r"\s*(<|>|/)\s*", r"\1", predict)
        accuracy_score = 1.0 if grade_answer(predict.strip(), ground_truth.strip()) else 0.0
        scores.append({"overall": accuracy_score, "format": 0.0, "accuracy": accuracy_score})
    return scores


# (prediction, ground truth, expected accuracy, expected format) for the "math" reward.
MATH_CASES = [
    # Well-formed.
    ("<think>2+2=4</think> The answer is \\boxed{4}.", "4", 1, 1),
    ("<think>2+2=4</think>\\boxed{5}", "4", 0, 1),
    ("<think></think>\\boxed{4}", "4", 1, 1),
    ("<think>\nstep 1\nstep 2\n</think>\n\n\\boxed{4}\n", "4", 1, 1),
    ("<think>t</think>\\boxed{4} is my final answer.", "4", 1, 1),
    ("<think>a</think><think>b</think>\\boxed{4}", "4", 1, 1),
    # Extra whitespace around tags and slashes.
    ("< think >reasoning< / think >\\boxed{4}", "4", 1, 1),
    ("< think>\n t \n</ think >  \\boxed{ 4 }", "4", 1, 1),
    ("<think>so a < b and c > d</think>\\boxed{4}", "4", 1, 1),
    ("<think>t</think>\\boxed{1 / 2}", "\\frac{1}{2}", 1, 1),
    # Malformed think tags.
    ("<think>reasoning \\boxed{4}", "4", 1, 0),
    ("reasoning</think>\\boxed{4}", "4", 1, 0),
    ("<Think>a</Think>\\boxed{4}", "4", 1, 0),
    ("Let me think. <think>t</think>\\boxed{4}", "4", 1, 0),
    ("<think>t<think>\\boxed{4}", "4", 1, 0),
    ("\\boxed{4}", "4", 1, 0),
    ("", "4", 0, 0),
    # Missing or broken \boxed.
    ("<think>t</think> The answer is 4.", "4", 0, 0),
    ("<think>t</think>\\boxed{4", "4", 0, 0),
    ("<think>t</think>\\boxed {4}", "4", 0, 0),
    ("<think>t</think>\\boxed{}", "4", 0, 1),
    ("<think>t</think>\\boxed{4} then \\boxed{5", "4", 0, 1),
    # Official quirk: a missing box is graded as the string "None".
    ("<think>t</think> no box here", "None", 1, 0),
    # Multiple boxed: the last one counts.
    ("<think>maybe \\boxed{3}</think> final \\boxed{4}", "4", 1, 1),
    ("<think>t</think>\\boxed{4} or \\boxed{3}", "4", 0, 1),
    # Nested braces.
    ("<think>t</think>\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1, 1),
    ("<think>t</think>\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1, 1),
    ("<think>t</think>\\boxed{{4}}", "4", 1, 1),
    # Fractions and LaTeX equivalents (Geometry3K-style answers, written here, not from the annotation files).
    ("<think>t</think>\\boxed{0.5}", "\\frac{1}{2}", 1, 1),
    ("<think>t</think>\\boxed{2/4}", "\\frac{1}{2}", 0, 1),
    ("<think>t</think>\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1, 1),
    ("<think>t</think>\\boxed{7.5}", "\\frac{15}{2}", 1, 1),
    ("<think>t</think>\\boxed{13.33}", "\\frac{40}{3}", 0, 1),
    ("<think>t</think>\\boxed{\\sqrt{12}}", "2\\sqrt{3}", 1, 1),
    ("<think>t</think>\\boxed{2 \\sqrt { 221 }}", "2\\sqrt{221}", 1, 1),
    ("<think>t</think>\\boxed{60^\\circ}", "60", 1, 1),
    ("<think>t</think>\\boxed{60 degrees}", "60", 1, 1),
    ("<think>t</think>\\boxed{x=5}", "5", 1, 1),
    ("<think>t</think>\\boxed{(1, 2)}", "(1,2)", 1, 1),
    ("<think>t</think>\\boxed{(2, 1)}", "(1,2)", 0, 1),
    # Numbers vs words.
    ("<think>t</think>\\boxed{three}", "3", 0, 1),
    ("<think>t</think>\\boxed{3.0}", "3", 1, 1),
    ("<think>t</think>\\boxed{1499}", "1,499", 1, 1),
    # Letters and words.
    ("<think>t</think>\\boxed{\\text{B}}", "B", 1, 1),
    ("<think>t</think>\\boxed{(B)}", "B", 1, 1),
    ("<think>t</think>\\boxed{b}", "B", 1, 1),
    ("<think>t</think>\\boxed{B.}", "B", 0, 1),
    ("<think>t</think>\\boxed{Yes}", "yes", 1, 1),
    ("<think>t</think>\\boxed{yes.}", "yes", 0, 1),
]

# Ground truths copied literally from the official annotations (ScienceQA, TextVQA, VizWiz, PathVQA test sets).
REAL_CASES = [
    ("<think>t</think>\\boxed{A}", "A", 1, 1),  # ScienceQA
    ("<think>t</think>\\boxed{C}", "E", 0, 1),  # ScienceQA
    ("<think>t</think>\\boxed{E}", "E", 1, 1),  # ScienceQA
    ("<think>t</think>\\boxed{Dakota}", "dakota", 1, 1),  # TextVQA
    ("<think>t</think>\\boxed{Yes}", "yes", 1, 1),  # TextVQA
    ("<think>t</think>\\boxed{coca-cola}", "coca cola", 0, 1),  # TextVQA
    ("<think>t</think>\\boxed{Coca Cola}", "coca cola", 1, 1),  # TextVQA
    ("<think>t</think>\\boxed{1.5}", "$1.50", 1, 1),  # TextVQA
    ("<think>t</think>\\boxed{11:51 AM}", "11:51 am", 1, 1),  # TextVQA
    ("<think>t</think>\\boxed{8.5}", "8 1/2", 1, 1),  # TextVQA
    ("<think>t</think>\\boxed{http: //www.entama.com /}", "http://www.entama.com/", 1, 1),  # TextVQA
    ("<think>t</think>\\boxed{02 / 20 / 2012}", "02/20/2012", 1, 1),  # TextVQA
    ("<think>t</think>\\boxed{Sony Ericsson}", "sony ericsson ", 1, 1),  # TextVQA
    ("<think>t</think>\\boxed{1499}", "1,499", 1, 1),  # TextVQA
    ("<think>t</think>\\boxed{2.7}", "2.70", 1, 1),  # TextVQA
    ("<think>t</think>\\boxed{0.75 mile}", "3/4 mile", 1, 1),  # TextVQA
    ("<think>t</think>\\boxed{Unanswerable}", "unanswerable", 1, 1),  # VizWiz
    ("<think>t</think>\\boxed{three musketeers}", "3 musketeers", 0, 1),  # VizWiz
    ("<think>t</think>\\boxed{computer screen}", "computer screen", 1, 1),  # VizWiz
    ("<think>t</think>\\boxed{45\\% complete}", "45% complete", 1, 1),  # VizWiz
    ("<think>t</think>\\boxed{No}", "no", 1, 1),  # VizWiz
    ("<think>t</think>\\boxed{histone subunits}", "the histone subunits", 0, 1),  # PathVQA
    ("<think>t</think>\\boxed{bone,skull}", "bone, skull", 1, 1),  # PathVQA
    ("<think>t</think>\\boxed{skull, bone}", "bone, skull", 0, 1),  # PathVQA
    ("<think>t</think>\\boxed{congestive heart failure}", "congestive heart failure,", 0, 1),  # PathVQA
    ("<think>t</think>\\boxed{Female Reproductive System}", "female reproductive system", 1, 1),  # PathVQA
    ("<think>t</think>\\boxed{20}", "20", 1, 1),  # PathVQA
    ("yes", "yes", 0, 0),  # PathVQA
]

ALL_MATH_CASES = MATH_CASES + REAL_CASES


def _columns(cases):
    predictions, ground_truths, accuracy, format_ = zip(*cases)
    return list(predictions), list(ground_truths), accuracy, format_


def test_math_matches_official_reference():
    predictions, ground_truths, _, _ = _columns(ALL_MATH_CASES)
    assert len(ALL_MATH_CASES) >= 70
    assert get_reward_fn("math")(predictions, ground_truths) == _reference_compute_score(predictions, ground_truths)


@pytest.mark.parametrize("prediction, ground_truth, accuracy, format_", ALL_MATH_CASES)
def test_math_expected_scores(prediction, ground_truth, accuracy, format_):
    (score,) = get_reward_fn("math")([prediction], [ground_truth])
    assert score == {"overall": 0.9 * accuracy + 0.1 * format_, "format": float(format_), "accuracy": float(accuracy)}


def test_math_overall_values_and_format_weight():
    predictions = ["<think>t</think>\\boxed{4}", "<think>t</think>\\boxed{5}", "\\boxed{4}", "4"]
    ground_truths = ["4"] * 4
    overall = [s["overall"] for s in get_reward_fn("math")(predictions, ground_truths)]
    assert overall == pytest.approx([1.0, 0.1, 0.9, 0.0], abs=1e-12)
    weighted = rewards.math_reward(predictions, ground_truths, format_weight=0.5)
    assert weighted == _reference_compute_score(predictions, ground_truths, format_weight=0.5)
    assert [s["overall"] for s in weighted] == [1.0, 0.5, 0.5, 0.0]


# (prediction, ground truth, expected accuracy, expected format) for the "no_cot" reward.
NO_COT_CASES = [
    ("B", "B", 1, 1),
    ("  B \n", "B", 1, 1),
    ("(B)", "B", 1, 1),
    ("B.", "B", 0, 1),
    ("The answer is B", "B", 0, 1),
    ("\\boxed{B}", "B", 1, 1),
    ("<think>x</think>B", "B", 0, 0),
    ("Yes", "yes", 1, 1),
    ("Sony Ericsson", "sony ericsson ", 1, 1),
    ("1 / 2", "\\frac{1}{2}", 1, 1),
    ("coca cola\nfinal", "coca cola", 0, 0),
    ("", "4", 0, 0),
    ("   ", "unanswerable", 0, 0),
    ("unanswerable", "unanswerable", 1, 1),
]


def test_no_cot_matches_official_reference_and_diagnostic_format():
    predictions, ground_truths, accuracy, format_ = _columns(NO_COT_CASES)
    scores = get_reward_fn("no_cot")(predictions, ground_truths)
    reference = _reference_no_cot(predictions, ground_truths)
    assert [(s["overall"], s["accuracy"]) for s in scores] == [(r["overall"], r["accuracy"]) for r in reference]
    assert [s["accuracy"] for s in scores] == list(map(float, accuracy))
    assert [s["overall"] for s in scores] == list(map(float, accuracy))
    assert [s["format"] for s in scores] == list(map(float, format_))


def test_extract_answer():
    assert extract_answer("<think>t</think>\\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{3} and \\boxed{ {4} }") == "{4}"
    assert extract_answer("<think>maybe \\boxed{3}</think>  Paris \n") == "Paris"
    assert extract_answer("<think>t</think>\\boxed{4") == "\\boxed{4"
    assert extract_answer("<think>t</think>\\boxed{None}") == "None"
    assert extract_answer("<think>t \\boxed{3}") == "3"
    assert extract_answer("  just text ") == "just text"


def test_normalize_text():
    assert normalize_text("  Coca   Cola.\n") == "coca cola"
    assert normalize_text("sony ericsson ") == "sony ericsson"
    assert normalize_text("Dr. Who...") == "dr. who"
    assert normalize_text("3.5") == "3.5"


EXACT_MATCH_CASES = [
    ("<think>t</think>\\boxed{Coca  Cola.}", "coca cola", 1, 1),
    ("<think>t</think>\\boxed{coca-cola}", "coca cola", 0, 1),
    ("<think>t</think> Sony Ericsson", "sony ericsson ", 1, 0),
    ("Unanswerable.", "unanswerable", 1, 0),
    ("<think>t</think>\\boxed{1.5}", "$1.50", 0, 1),
    ("<think>t</think>\\boxed{http: //www.entama.com /}", "http://www.entama.com/", 1, 1),
    ("<think>t</think>\\boxed{bone, skull}", "bone, skull", 1, 1),
    ("<think>t</think>\\boxed{bone,skull}", "bone, skull", 0, 1),
]


def test_exact_match():
    predictions, ground_truths, accuracy, format_ = _columns(EXACT_MATCH_CASES)
    scores = get_reward_fn("exact_match")(predictions, ground_truths)
    assert [s["accuracy"] for s in scores] == list(map(float, accuracy))
    assert [s["format"] for s in scores] == list(map(float, format_))
    assert [s["overall"] for s in scores] == pytest.approx([0.9 * a + 0.1 * f for a, f in zip(accuracy, format_)])


@pytest.mark.parametrize(
    "answer, letter",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("B: how steady a parachute was", "B"),
        ("B. how steady a parachute with a 1 m vent was at 200 km per hour", "B"),
        ("\\text{J}", "J"),
        (" C ", "C"),
        ("K", None),
        ("b", None),
        ("BC", None),
        ("The answer is B", None),
        ("Because", None),
        ("", None),
    ],
)
def test_extract_choice(answer, letter):
    assert extract_choice(answer) == letter


MULTIPLE_CHOICE_CASES = [
    ("<think>t</think>\\boxed{B}", "B", 1, 1),
    ("<think>t</think>\\boxed{(B)}", "B", 1, 1),
    ("<think>t</think>\\boxed{B. how steady a parachute}", "B", 1, 1),
    ("<think>t</think>\\boxed{A}", "B", 0, 1),
    ("<think>t</think> (C)", "C", 1, 0),
    ("D.", "D", 1, 0),
    ("E", "E", 1, 0),
    ("<think>t</think>\\boxed{The answer is A}", "A", 0, 1),
    ("<think>t</think>\\boxed{A} or \\boxed{C}", "A", 0, 1),
]


def test_multiple_choice():
    predictions, ground_truths, accuracy, format_ = _columns(MULTIPLE_CHOICE_CASES)
    scores = get_reward_fn("multiple_choice")(predictions, ground_truths)
    assert [s["accuracy"] for s in scores] == list(map(float, accuracy))
    assert [s["format"] for s in scores] == list(map(float, format_))


def test_multiple_choice_rejects_free_form_ground_truth():
    with pytest.raises(ValueError, match="'coca cola' is not an option letter"):
        get_reward_fn("multiple_choice")(["\\boxed{A}"], ["coca cola"])


def test_registry():
    assert {"math", "no_cot", "exact_match", "multiple_choice"} <= set(rewards.REWARDS)
    assert get_reward_fn("math") is rewards.math_reward
    with pytest.raises(ValueError, match="unknown reward 'maths'; known rewards: exact_match, math, multiple_choice"):
        get_reward_fn("maths")


def test_register_reward(monkeypatch):
    monkeypatch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))

    @register_reward("length")
    def length_reward(predictions, ground_truths):
        return [{"overall": float(len(p)), "format": 0.0, "accuracy": 0.0} for p in predictions]

    assert get_reward_fn("length")(["abc"], ["x"]) == [{"overall": 3.0, "format": 0.0, "accuracy": 0.0}]
    with pytest.raises(ValueError, match="reward 'math' is already registered"):
        register_reward("math")(length_reward)


@pytest.mark.parametrize("name", ["math", "no_cot", "exact_match", "multiple_choice"])
def test_length_mismatch_is_an_error(name):
    with pytest.raises(ValueError, match="got 2 predictions but 1 ground truths"):
        get_reward_fn(name)(["A", "B"], ["A"])
