import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax.rl import diagnostics as dg
from cpt_jax.rl.advantages import get_advantage_fn


def test_group_stats_on_a_hand_made_batch():
    # 3 groups of 4: all correct, all wrong, mixed (2 of 4); rewards 0.9*acc + 0.1*format.
    acc = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0], float)
    rewards = 0.9 * acc + 0.1
    s = dg.group_reward_stats(rewards, acc, 4)
    np.testing.assert_allclose(s["group_mean"], [1.0, 0.1, 0.55])
    np.testing.assert_allclose(s["group_var"], [0.0, 0.0, 0.2025])
    assert s["reward_var"] == pytest.approx(0.2025 / 3)
    assert s["zero_var_frac"] == pytest.approx(2 / 3)
    assert (s["all_correct_frac"], s["all_wrong_frac"], s["mixed_frac"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert s["accuracy_hist"] == [1, 0, 1, 0, 1]


def test_group_stats_reject_ragged_input():
    with pytest.raises(ValueError, match="group_size=4"):
        dg.group_reward_stats(np.zeros(6), np.zeros(6), 4)


def test_zero_variance_groups_contribute_nothing_and_contributions_grow_with_variance():
    rng = np.random.default_rng(0)
    g, n_groups, dim = 4, 3, 5
    x = jnp.asarray(rng.standard_normal((g * n_groups, dim)), jnp.float32)
    rewards = jnp.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 1, 0], jnp.float32)
    adv = get_advantage_fn("reinforce")(rewards, g)

    def loss(w, row_weight):  # REINFORCE surrogate: -A * log p, log p = log_sigmoid(x.w)
        return -jnp.sum(row_weight * adv * jax.nn.log_sigmoid(x @ w))

    norms = dg.group_contributions(jax.jit(jax.grad(loss)), jnp.ones(dim), g * n_groups, g, [0, 1, 2])
    assert norms[0] == 0.0  # all-correct group: zero variance, exactly zero gradient
    assert norms[1] > 0 and norms[2] > 0


def test_diagonal_fisher_and_risk_match_the_closed_form():
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((6, 3)).astype(np.float32)
    ys = rng.standard_normal(6).astype(np.float32)
    w = np.array([0.5, -1.0, 2.0], np.float32)

    def nll(params, example):
        x, y = example
        return 0.5 * jnp.square(jnp.dot(params["w"], x) - y)

    fisher = dg.diagonal_fisher(jax.jit(jax.grad(nll)), {"w": jnp.asarray(w)}, list(zip(xs, ys)))
    expected = np.mean(((xs @ w - ys)[:, None] * xs) ** 2, axis=0)
    np.testing.assert_allclose(fisher["w"], expected, rtol=1e-5)
    update = {"w": jnp.array([1.0, 2.0, -1.0])}
    assert float(dg.forgetting_risk(fisher, update)) == pytest.approx(float(np.sum(expected * [1, 4, 1])), rel=1e-5)
    summary = dg.risk_summary(fisher, update, {"w": 2 * update["w"]}, reward_var=0.1)
    assert summary["risk_ratio"] == pytest.approx(0.25)
    assert summary["reward_var"] == 0.1


def test_fisher_needs_examples():
    with pytest.raises(ValueError, match="held-out"):
        dg.diagonal_fisher(lambda p, e: 0.0, {}, [])


def test_writer_appends_jsonl(tmp_path):
    w = dg.DiagnosticsWriter(tmp_path / "d" / "diag.jsonl")
    w.write(1, {"reward_var": 0.5})
    w.write(2, {"reward_var": 0.25})
    assert w.read() == [{"step": 1, "reward_var": 0.5}, {"step": 2, "reward_var": 0.25}]
    silent = dg.DiagnosticsWriter(tmp_path / "other.jsonl", enabled=False)
    silent.write(1, {"x": 1})
    assert silent.read() == []
