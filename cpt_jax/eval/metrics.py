"""Continual-learning metrics over an accuracy matrix, and the run summary they are reported in.

`A[t][i]` is the accuracy (a fraction in [0, 1]) on task i after training task t of a T-task sequence, so
row t is the evaluation after the t-th task and the diagonal is each task right after it was learned.
The entries a metric needs are the lower triangle (i <= t); the upper triangle (tasks not trained yet) may hold
zero-shot accuracies or be None/NaN. Forgetting-type metrics are signed like the paper's FM: negative means the
sequence lost accuracy on earlier tasks; with a single task there is nothing to forget and they are 0.
"""

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np


def _check_fraction(value, name):
    """`value` as a float, or an error naming `name` if it is not a number in [0, 1]."""
    if isinstance(value, str) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} = {value!r} is not a number; accuracies are fractions in [0, 1]")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} = {value} is not finite; evaluate that task or check the evaluation for NaNs")
    if not 0.0 <= value <= 1.0:
        hint = " (it looks like a percentage: divide by 100)" if 1.0 < value <= 100.0 else ""
        raise ValueError(f"{name} = {value} is outside [0, 1]{hint}")
    return value


def as_accuracy_matrix(accuracy_matrix):
    """A validated accuracy matrix as a (T, T) float64 array; missing upper-triangle entries become NaN.

    Raises TypeError/ValueError naming the first bad entry: non-square rows, missing or non-finite entries with
    column <= row, or values outside [0, 1].
    """
    if isinstance(accuracy_matrix, (str, bytes)) or not isinstance(accuracy_matrix, (Sequence, np.ndarray)):
        raise TypeError(
            f"accuracy matrix must be a T x T list of rows or array, got {type(accuracy_matrix).__name__}"
        )
    num_tasks = len(accuracy_matrix)
    if num_tasks == 0:
        raise ValueError("accuracy matrix is empty; it needs one row per trained task")
    matrix_TxT = np.full((num_tasks, num_tasks), np.nan)
    for t, row in enumerate(accuracy_matrix):
        if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray)):
            raise TypeError(f"accuracy_matrix[{t}] = {row!r} is not a row; pass a list of T x T accuracies")
        if len(row) != num_tasks:
            raise ValueError(
                f"accuracy_matrix[{t}] has {len(row)} entries but the matrix has {num_tasks} rows; it must be "
                "square (T x T): row t holds the accuracy on every task after training task t"
            )
        for i, value in enumerate(row):
            name = f"accuracy_matrix[{t}][{i}]"
            if i > t and (value is None or (isinstance(value, numbers.Real) and math.isnan(value))):
                continue
            if value is None:
                raise ValueError(
                    f"{name} is missing; task {i} must be evaluated after training task {t} (every entry with "
                    "column <= row is needed)"
                )
            matrix_TxT[t, i] = _check_fraction(value, name)
    return matrix_TxT


def average_accuracy(accuracy_matrix):
    """AA: mean accuracy over all tasks after the last one, mean_i A[T-1][i]."""
    matrix_TxT = as_accuracy_matrix(accuracy_matrix)
    return float(matrix_TxT[-1].mean())


def _final_minus_learned(matrix_TxT):
    """Mean over earlier tasks k < T-1 of A[T-1][k] - A[k][k]; 0 for a single task."""
    if len(matrix_TxT) == 1:
        return 0.0
    earlier = np.arange(len(matrix_TxT) - 1)
    return float(np.mean(matrix_TxT[-1, earlier] - matrix_TxT[earlier, earlier]))


def forgetting(accuracy_matrix):
    """FM as in the paper: 1/(T-1) sum_{k<T-1} (A[T-1][k] - A[k][k]); negative when earlier tasks degrade.

    Numerically the same as `backward_transfer` (Lopez-Paz & Ranzato's BWT); both names are reported because the
    paper and the continual-learning literature each use one.
    """
    return _final_minus_learned(as_accuracy_matrix(accuracy_matrix))


def forgetting_max(accuracy_matrix):
    """Average change from each earlier task's best accuracy before the end of the sequence.

    1/(T-1) sum_{k<T-1} (A[T-1][k] - max_{k<=t<T-1} A[t][k]): signed like FM and never above it, since a task
    that kept improving after it was learned counts its drop from the peak rather than from A[k][k].
    """
    matrix_TxT = as_accuracy_matrix(accuracy_matrix)
    num_tasks = len(matrix_TxT)
    if num_tasks == 1:
        return 0.0
    drops = [matrix_TxT[-1, k] - matrix_TxT[k : num_tasks - 1, k].max() for k in range(num_tasks - 1)]
    return float(np.mean(drops))


def backward_transfer(accuracy_matrix):
    """BWT (Lopez-Paz & Ranzato, 2017): 1/(T-1) sum_{i<T-1} (A[T-1][i] - A[i][i]); 0 for a single task."""
    return _final_minus_learned(as_accuracy_matrix(accuracy_matrix))


def plasticity(accuracy_matrix):
    """Accuracy on each task right after learning it: the diagonal [A[k][k] for k in range(T)]."""
    return np.diag(as_accuracy_matrix(accuracy_matrix)).tolist()


def _check_scores(scores, name):
    """Scores as {benchmark or task: fraction}; None means none were evaluated."""
    if scores is None:
        return {}
    if not isinstance(scores, Mapping):
        raise TypeError(f"{name} must map benchmark names to accuracies, got {type(scores).__name__}")
    return {str(key): _check_fraction(value, f"{name}[{key!r}]") for key, value in scores.items()}


def _jsonable(value):
    """`value` as plain JSON: numpy arrays and scalars become lists and Python numbers.

    Non-finite floats (a step where a diagnostic was undefined) become None, since strict JSON has no NaN.
    """
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summarize(method, tasks, accuracy_matrix, general_before=None, general_after=None, diagnostics=None,
              initial=None):
    """The results summary of one continual run, in the `DIR/results/summary.json` schema.

    Args:
      method: name of the training method (e.g. "sft", "rft").
      tasks: the T task names in training order.
      accuracy_matrix: T x T fractions, row t = after training task t (see the module docstring).
      general_before, general_after: {benchmark: accuracy} on held-out general tasks before and after the sequence.
      diagnostics: free-form training diagnostics (e.g. per-step "reward_var", "zero_var_frac", "risk_ratio").
      initial: {task: accuracy} of the initial model on the sequence's tasks, so plasticity reads as a gain.

    Returns:
      A JSON-serialisable dict with keys method, tasks, accuracy_matrix, AA, FM, FM_max, BWT, plasticity,
      general {before, after}, diagnostics and initial ({} when not given).
    """
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty string, got {method!r}")
    matrix_TxT = as_accuracy_matrix(accuracy_matrix)
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not all(isinstance(t, str) for t in tasks):
        raise TypeError(f"tasks must be a list of task names (strings), got {tasks!r}")
    if len(tasks) != len(matrix_TxT):
        raise ValueError(
            f"{len(tasks)} task names {list(tasks)} for a {len(matrix_TxT)} x {len(matrix_TxT)} accuracy matrix; "
            "pass one name per task, in training order"
        )
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task names {list(tasks)} repeat; give each task of the sequence a distinct name")
    initial = _check_scores(initial, "initial")
    if set(initial) - set(tasks):
        raise ValueError(f"initial has accuracies of {sorted(set(initial) - set(tasks))}, which are not among the "
                         f"tasks {list(tasks)}")
    if diagnostics is not None and not isinstance(diagnostics, Mapping):
        raise TypeError(f"diagnostics must be a dict, got {type(diagnostics).__name__}")
    rows = [[None if math.isnan(value) else value for value in row] for row in matrix_TxT.tolist()]
    return {
        "method": method,
        "tasks": list(tasks),
        "accuracy_matrix": rows,
        "AA": average_accuracy(matrix_TxT),
        "FM": forgetting(matrix_TxT),
        "FM_max": forgetting_max(matrix_TxT),
        "BWT": backward_transfer(matrix_TxT),
        "plasticity": plasticity(matrix_TxT),
        "general": {
            "before": _check_scores(general_before, "general_before"),
            "after": _check_scores(general_after, "general_after"),
        },
        "diagnostics": _jsonable(diagnostics or {}),
        "initial": initial,
    }
