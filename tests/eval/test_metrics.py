"""Continual-learning metrics on hand-made accuracy matrices with hand-computed values."""

import json
import math

import numpy as np
import pytest

from cpt_jax.eval import metrics

# Task 0 improves after task 1 is learned (0.8 -> 0.85), so FM_max (drop from the peak) differs from FM.
# The upper triangle holds zero-shot accuracies, which no metric reads.
A3 = [
    [0.8, 0.1, 0.2],
    [0.85, 0.9, 0.3],
    [0.5, 0.7, 0.6],
]
# AA = (0.5 + 0.7 + 0.6) / 3; FM = BWT = ((0.5 - 0.8) + (0.7 - 0.9)) / 2
# FM_max = ((0.5 - 0.85) + (0.7 - 0.9)) / 2
A3_EXPECTED = {"AA": 0.6, "FM": -0.25, "FM_max": -0.275, "BWT": -0.25, "plasticity": [0.8, 0.9, 0.6]}

# Untrained tasks left as None; task 1 peaks after task 2 (0.85) and task 2 gains from task 3 (0.7 -> 0.8).
A4 = [
    [0.9, None, None, None],
    [0.7, 0.8, None, None],
    [0.75, 0.85, 0.7, None],
    [0.5, 0.65, 0.8, 1.0],
]
# AA = (0.5 + 0.65 + 0.8 + 1.0) / 4 = 0.7375
# FM = BWT = ((0.5 - 0.9) + (0.65 - 0.8) + (0.8 - 0.7)) / 3 = -0.45 / 3 = -0.15
# FM_max = ((0.5 - 0.9) + (0.65 - 0.85) + (0.8 - 0.7)) / 3 = -0.5 / 3
A4_EXPECTED = {"AA": 0.7375, "FM": -0.15, "FM_max": -0.5 / 3, "BWT": -0.15, "plasticity": [0.9, 0.8, 0.7, 1.0]}

FUNCTIONS = {
    "AA": metrics.average_accuracy,
    "FM": metrics.forgetting,
    "FM_max": metrics.forgetting_max,
    "BWT": metrics.backward_transfer,
    "plasticity": metrics.plasticity,
}


@pytest.mark.parametrize("matrix, expected", [(A3, A3_EXPECTED), (A4, A4_EXPECTED)], ids=["3x3", "4x4"])
@pytest.mark.parametrize("key", list(FUNCTIONS))
def test_metrics_match_hand_computed_values(matrix, expected, key):
    assert FUNCTIONS[key](matrix) == pytest.approx(expected[key], abs=1e-12)


def test_numpy_input_gives_the_same_values():
    matrix = np.array([[np.nan if v is None else v for v in row] for row in A4], dtype=np.float32)
    assert metrics.forgetting_max(matrix) == pytest.approx(-0.5 / 3, abs=1e-6)
    assert metrics.average_accuracy(matrix) == pytest.approx(0.7375, abs=1e-6)


def test_single_task_has_nothing_to_forget():
    assert metrics.average_accuracy([[0.4]]) == pytest.approx(0.4)
    assert metrics.forgetting([[0.4]]) == 0.0
    assert metrics.forgetting_max([[0.4]]) == 0.0
    assert metrics.backward_transfer([[0.4]]) == 0.0
    assert metrics.plasticity([[0.4]]) == [0.4]


@pytest.mark.parametrize(
    "matrix, error, match",
    [
        ([], ValueError, "empty"),
        ([[0.5, 0.1], [0.4]], ValueError, r"accuracy_matrix\[1\] has 1 entries .* 2 rows"),
        ([[0.5, 0.1], [0.4, 0.6], [0.3, 0.2]], ValueError, r"accuracy_matrix\[0\] has 2 entries .* 3 rows"),
        ([[0.5, None], [None, 0.6]], ValueError, r"accuracy_matrix\[1\]\[0\] is missing"),
        ([[0.5, None], [80.0, 0.6]], ValueError, r"accuracy_matrix\[1\]\[0\] = 80.0 .*percentage"),
        ([[0.5, None], [0.4, -0.1]], ValueError, r"accuracy_matrix\[1\]\[1\] = -0.1 is outside \[0, 1\]"),
        ([[0.5, 1.5], [0.4, 0.6]], ValueError, r"accuracy_matrix\[0\]\[1\] = 1.5 is outside"),
        ([[float("nan"), None], [0.4, 0.6]], ValueError, r"accuracy_matrix\[0\]\[0\] = nan is not finite"),
        ([[0.5, None], ["0.4", 0.6]], TypeError, r"accuracy_matrix\[1\]\[0\] = '0.4' is not a number"),
        ([0.5, 0.6], TypeError, r"accuracy_matrix\[0\] = 0.5 is not a row"),
        ("0.5", TypeError, "list of rows"),
    ],
)
def test_invalid_matrices_name_the_bad_entry(matrix, error, match):
    with pytest.raises(error, match=match):
        metrics.forgetting(matrix)


def test_summarize_follows_the_results_schema():
    diagnostics = {"reward_var": np.array([0.25, np.nan, 0.1], np.float32), "steps": np.int64(2)}
    summary = metrics.summarize(
        "rft", ["a", "b", "c", "d"], A4, {"mmmu": 0.5}, {"mmmu": 0.45, "pope": 0.9}, diagnostics,
        initial={"a": 0.25, "c": np.float32(0.5)},
    )
    assert list(summary) == [
        "method", "tasks", "accuracy_matrix", "AA", "FM", "FM_max", "BWT", "plasticity", "general", "diagnostics",
        "initial",
    ]
    assert summary["initial"] == {"a": 0.25, "c": 0.5}
    assert summary["method"] == "rft"
    assert summary["tasks"] == ["a", "b", "c", "d"]
    assert summary["accuracy_matrix"] == A4
    for key in ("AA", "FM", "FM_max", "BWT"):
        assert summary[key] == pytest.approx(A4_EXPECTED[key], abs=1e-12)
    assert summary["plasticity"] == pytest.approx(A4_EXPECTED["plasticity"])
    assert summary["general"] == {"before": {"mmmu": 0.5}, "after": {"mmmu": 0.45, "pope": 0.9}}
    assert summary["diagnostics"]["reward_var"] == pytest.approx([0.25, None, 0.1])
    assert summary["diagnostics"]["steps"] == 2 and type(summary["diagnostics"]["steps"]) is int
    # Strict JSON: no NaN for the untrained entries, no numpy types.
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary


def test_summarize_turns_nan_upper_triangle_into_none():
    summary = metrics.summarize("sft", ["a", "b"], [[0.5, math.nan], [0.25, 0.75]])
    assert summary["accuracy_matrix"] == [[0.5, None], [0.25, 0.75]]
    assert summary["general"] == {"before": {}, "after": {}}
    assert summary["diagnostics"] == {}
    assert summary["initial"] == {}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": ""}, ValueError, "method must be a non-empty string"),
        ({"tasks": ["a", "b"]}, ValueError, r"2 task names .* 3 x 3"),
        ({"tasks": ["a", "b", "a"]}, ValueError, "repeat"),
        ({"tasks": "abc"}, TypeError, "list of task names"),
        ({"general_after": {"mmmu": 54.2}}, ValueError, r"general_after\['mmmu'\] = 54.2 .*percentage"),
        ({"general_before": [0.5]}, TypeError, "general_before must map benchmark names"),
        ({"diagnostics": [0.1]}, TypeError, "diagnostics must be a dict"),
        ({"initial": {"a": 0.5, "z": 0.5}}, ValueError, r"initial has accuracies of \['z'\], which are not"),
        ({"initial": {"a": 50.0}}, ValueError, r"initial\['a'\] = 50.0 .*percentage"),
    ],
)
def test_summarize_rejects_bad_inputs(kwargs, error, match):
    arguments = {"method": "sft", "tasks": ["a", "b", "c"], "accuracy_matrix": A3} | kwargs
    with pytest.raises(error, match=match):
        metrics.summarize(**arguments)
