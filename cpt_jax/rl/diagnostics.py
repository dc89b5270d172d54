"""Reward-variance diagnostics: making the paper's implicit-regularisation argument measurable.

The paper argues that RFT forgets less because its update is scaled by the reward variance of each prompt's group
of samples: groups that are all-correct or all-wrong contribute (exactly, for GRPO) no gradient, and the remaining
update stays close to what the model already does. Three measurements make this concrete, every step:

1. group statistics: per-group reward mean/variance, the fractions of all-correct / all-wrong / mixed groups and a
   histogram of group accuracy (host-side numpy, free);
2. each group's contribution to the update (gradient norm of the loss restricted to that group) against its reward
   variance, on a configurable subsample of groups (one backward pass per sampled group);
3. the forgetting risk R(g) = sum_j F_j g_j^2 of an update g, with F a diagonal empirical Fisher estimated on
   held-out samples of earlier tasks, for the RFT update and for an SFT gradient on the same prompts, and their
   ratio (the quadratic term of the loss increase on earlier tasks under a step along g).

Costs are bounded by `num_groups` (2) and the Fisher sample count (3), and the whole diagnostic is switchable.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def group_reward_stats(rewards, accuracies, group_size: int, *, correct_threshold: float = 1.0) -> dict[str, Any]:
    """Per-group reward mean/variance (ddof=0) and the all-correct / all-wrong / mixed fractions.

    `rewards` and `accuracies` are (num_prompts * group_size,) with the samples of prompt b in rows
    b*G .. b*G+G-1; a sample counts as correct when its accuracy >= `correct_threshold`.
    """
    rewards = np.asarray(rewards, np.float64)
    accuracies = np.asarray(accuracies, np.float64)
    if rewards.ndim != 1 or rewards.shape != accuracies.shape or rewards.size % group_size:
        raise ValueError(f"rewards {rewards.shape} and accuracies {accuracies.shape} must be equal 1-D shapes "
                         f"divisible by group_size={group_size}")
    r = rewards.reshape(-1, group_size)
    correct = (accuracies.reshape(-1, group_size) >= correct_threshold).sum(-1)
    var = r.var(-1)
    return {
        "group_mean": r.mean(-1).tolist(),
        "group_var": var.tolist(),
        "reward_var": float(var.mean()),
        "zero_var_frac": float((var == 0).mean()),
        "all_correct_frac": float((correct == group_size).mean()),
        "all_wrong_frac": float((correct == 0).mean()),
        "mixed_frac": float(((correct > 0) & (correct < group_size)).mean()),
        "accuracy_hist": np.bincount(correct, minlength=group_size + 1).tolist(),
    }


@jax.jit  # one program, not one dispatch per leaf
def tree_sq_norm(tree) -> jax.Array:
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def group_contributions(grad_fn: Callable[[Any, jax.Array], Any], params, num_rows: int, group_size: int,
                        groups: Sequence[int]) -> np.ndarray:
    """Gradient norm of the loss restricted to each listed group.

    `grad_fn(params, row_weight (num_rows,)) -> grads` is the (jitted, reused) gradient of a loss that scales each
    row's contribution by `row_weight` (the RFT loss takes it for this purpose); one backward pass per group, so
    `groups` bounds the cost.
    """
    grad = grad_fn
    norms = []
    for g in groups:
        weight = np.zeros(num_rows, np.float32)
        weight[g * group_size:(g + 1) * group_size] = 1.0
        norms.append(jnp.sqrt(tree_sq_norm(grad(params, jnp.asarray(weight)))))
    return np.asarray(jax.device_get(norms), np.float64)


def diagonal_fisher(grad_fn: Callable[[Any, Any], Any], params, examples: Sequence[Any]):
    """Diagonal empirical Fisher: the mean over examples of the squared gradient of each example's NLL.

    `grad_fn(params, example) -> grads` is the (jitted, reused) gradient of one held-out example's negative
    log-likelihood (a batch of one); gradients are taken one example at a time so memory stays at one gradient.
    """
    if not examples:
        raise ValueError("diagonal_fisher needs at least one held-out example of an earlier task")
    grad = grad_fn
    total = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    for example in examples:
        total = _add_square(total, grad(params, example))
    return jax.tree.map(lambda x: x / len(examples), total)


@jax.jit
def _add_square(total, grads):
    return jax.tree.map(lambda a, b: a + jnp.square(b.astype(jnp.float32)), total, grads)


@jax.jit
def forgetting_risk(fisher, update) -> jax.Array:
    """R(g) = sum_j F_j g_j^2: the Fisher-weighted squared size of an update (second-order loss increase)."""
    return sum(jnp.sum(f * jnp.square(g.astype(jnp.float32)))
               for f, g in zip(jax.tree.leaves(fisher), jax.tree.leaves(update)))


def risk_summary(fisher, rft_grad, sft_grad, reward_var: float) -> dict[str, float]:
    """Risks of the RFT and SFT gradients on the same prompts, their ratio, beside the mean reward variance."""
    rft, sft = (float(jax.device_get(forgetting_risk(fisher, g))) for g in (rft_grad, sft_grad))
    return {"risk_rft": rft, "risk_sft": sft, "risk_ratio": rft / sft if sft > 0 else float("nan"),
            "reward_var": float(reward_var)}


class DiagnosticsWriter:
    """Appends one JSON object per step to a JSONL file (process 0 only writes; others pass `enabled=False`)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = os.fspath(path)
        self.enabled = enabled
        if enabled:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)

    def write(self, step: int, record: dict[str, Any]):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **record}) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]
