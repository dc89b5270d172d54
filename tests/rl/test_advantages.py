"""Advantage estimators against hand-written numpy references: values, Jacobians, policy gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    get_advantage_fn,
    register_advantage,
)
from cpt_jax.rl.losses import policy_loss

EPS = 1e-6


def np_grpo(rewards, group_size, ddof=1):
    out = np.empty_like(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        out[start : start + group_size] = (group - group.mean()) / (group.std(ddof=ddof) + EPS)
    return out


def np_mean_baseline(rewards, group_size):
    out = np.empty_like(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        out[start : start + group_size] = group - group.mean()
    return out


def np_rloo(rewards, group_size):
    out = np.empty_like(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        for i in range(group_size):
            others = np.delete(group, i)
            out[start + i] = group[i] - others.mean()
    return out


REFERENCES = {
    "grpo": np_grpo,
    "drgrpo": np_mean_baseline,
    "reinforce": np_mean_baseline,
    "rloo": np_rloo,
}


def _rewards(num_prompts, group_size, seed, dtype=np.float32):
    """Paper-style rewards 0.9 * accuracy + 0.1 * format, plus a continuous component so ties are rare."""
    rng = np.random.default_rng(seed)
    shape = (num_prompts * group_size,)
    rewards = 0.9 * rng.integers(0, 2, shape) + 0.1 * rng.integers(0, 2, shape) + 0.05 * rng.random(shape)
    return rewards.astype(dtype)


def test_registry_names_and_unknown_name():
    assert {"grpo", "drgrpo", "rloo", "remax", "reinforce"} <= set(ADVANTAGE_ESTIMATORS)
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'gpro'.*'drgrpo'.*'grpo'.*'rloo'"):
        get_advantage_fn("gpro")
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(lambda rewards_BG, group_size: rewards_BG)


@pytest.mark.parametrize("group_size", [5, 8])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_values_match_numpy(name, group_size):
    rewards = _rewards(4, group_size, seed=group_size)
    got = get_advantage_fn(name)(jnp.asarray(rewards), group_size)
    assert got.shape == rewards.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, REFERENCES[name](rewards.astype(np.float64), group_size), rtol=2e-5, atol=2e-6)


def test_grpo_population_std_option():
    rewards = _rewards(3, 6, seed=1)
    got = get_advantage_fn("grpo")(jnp.asarray(rewards), 6, ddof=0)
    np.testing.assert_allclose(got, np_grpo(rewards.astype(np.float64), 6, ddof=0), rtol=2e-5, atol=2e-6)
    assert not np.allclose(got, np_grpo(rewards.astype(np.float64), 6, ddof=1), rtol=1e-3)


def test_remax_subtracts_the_greedy_reward_of_each_prompt():
    rewards = _rewards(3, 4, seed=2)
    baseline = np.array([0.9, 0.0, 0.1], np.float32)
    got = get_advantage_fn("remax")(jnp.asarray(rewards), 4, baseline_rewards=jnp.asarray(baseline))
    np.testing.assert_allclose(got, rewards - np.repeat(baseline, 4), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="needs baseline_rewards"):
        get_advantage_fn("remax")(jnp.asarray(rewards), 4)
    with pytest.raises(ValueError, match=r"baseline_rewards has shape \(4,\), expected \(3,\)"):
        get_advantage_fn("remax")(jnp.asarray(rewards), 4, baseline_rewards=jnp.zeros(4))


def test_rloo_is_leave_one_out_scaled_mean_baseline():
    rewards = _rewards(2, 4, seed=3)
    rloo = get_advantage_fn("rloo")(jnp.asarray(rewards), 4)
    reinforce = get_advantage_fn("reinforce")(jnp.asarray(rewards), 4)
    np.testing.assert_allclose(rloo, reinforce * 4 / 3, rtol=1e-6, atol=1e-7)


def test_unnormalised_estimators_scale_with_rewards_and_grpo_does_not():
    rewards = jnp.asarray(_rewards(3, 8, seed=4))
    for name, scale_power in [("reinforce", 1), ("drgrpo", 1), ("rloo", 1), ("grpo", 0)]:
        fn = get_advantage_fn(name)
        np.testing.assert_allclose(fn(0.25 * rewards, 8), 0.25**scale_power * fn(rewards, 8), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_jacobian_matches_finite_differences_float64(name):
    group_size = 4
    rewards = _rewards(3, group_size, seed=5, dtype=np.float64)
    step = 1e-6
    expected = np.stack(
        [
            (REFERENCES[name](rewards + step * e, group_size) - REFERENCES[name](rewards - step * e, group_size))
            / (2 * step)
            for e in np.eye(rewards.size)
        ],
        axis=1,
    )
    with jax.enable_x64(True):
        jacobian = jax.jit(jax.jacobian(lambda r: get_advantage_fn(name)(r, group_size)))(jnp.asarray(rewards))
        assert jacobian.dtype == jnp.float64
    np.testing.assert_allclose(jacobian, expected, rtol=1e-6, atol=1e-6)
    # Rewards of one prompt never move the advantages of another.
    blocks = np.kron(np.eye(3), np.ones((group_size, group_size)))
    assert np.all(np.asarray(jacobian)[blocks == 0] == 0)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_policy_gradient_through_each_estimator_float64(name):
    """d loss / d log p = -A * ratio / (#valid tokens) on unclipped valid tokens (token-mean)."""
    group_size, length = 4, 6
    rewards = _rewards(2, group_size, seed=6, dtype=np.float64)
    rng = np.random.default_rng(7)
    lengths = np.array([6, 3, 1, 5, 2, 6, 4, 1])
    mask = np.arange(length)[None, :] < lengths[:, None]
    old = -rng.random((8, length)) * 3
    # Small drift keeps every ratio inside [0.8, 1.3], where nothing is clipped.
    logprobs = old + rng.uniform(-0.1, 0.1, old.shape)
    advantages = REFERENCES[name](rewards, group_size)
    expected = np.where(mask, -advantages[:, None] * np.exp(logprobs - old), 0) / mask.sum()
    with jax.enable_x64(True):
        adv = get_advantage_fn(name)(jnp.asarray(rewards), group_size)

        def loss_fn(lp):
            return policy_loss(lp, jnp.asarray(old), adv, jnp.asarray(mask))[0]

        grad = jax.jit(jax.grad(loss_fn))(jnp.asarray(logprobs))
        assert grad.dtype == jnp.float64
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "reinforce", "rloo"])
def test_zero_variance_groups_give_exactly_zero(name):
    # Eight float32 rewards of 0.9 average to 0.9 - 6e-8: a naive r - mean(r) is not zero here.
    constant_groups = [np.full(8, v, np.float32) for v in (0.9, 0.1, 0.0, 1.0)]
    mixed = np.array([1.0, 0.0, 0.9, 0.1, 1.0, 1.0, 0.0, 0.9], np.float32)
    rewards = np.concatenate([constant_groups[0], mixed, *constant_groups[1:]])
    fn = get_advantage_fn(name)
    eager = np.asarray(fn(jnp.asarray(rewards), 8))
    jitted = np.asarray(jax.jit(fn, static_argnums=1)(jnp.asarray(rewards), 8))
    for advantages in (eager, jitted):
        assert np.all(advantages[np.r_[0:8, 16:40]] == 0)
        assert np.all(advantages[8:16] != 0)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)


def test_zero_variance_group_gives_exactly_zero_policy_gradient():
    rewards = np.concatenate([np.full(8, 0.9, np.float32), [1.0, 0.0, 0.9, 0.1, 1.0, 1.0, 0.0, 0.9]])
    rng = np.random.default_rng(8)
    old = jnp.asarray(-rng.random((16, 5)) * 3, jnp.float32)
    # Ratios well outside the clip range on both sides, so clipping and dual clipping are exercised too.
    logprobs = old + jnp.asarray(rng.uniform(-1.5, 1.5, old.shape), jnp.float32)
    mask = jnp.ones((16, 5), bool)
    for ddof in (0, 1):
        advantages = get_advantage_fn("grpo")(jnp.asarray(rewards), 8, ddof=ddof)
        grad = np.asarray(jax.jit(jax.grad(lambda lp: policy_loss(lp, old, advantages, mask)[0]))(logprobs))
        assert np.all(grad[:8] == 0)
        assert np.count_nonzero(grad[8:]) > 10


def test_bad_layouts_name_the_problem():
    with pytest.raises(ValueError, match="10 rewards do not split into groups of 4"):
        get_advantage_fn("grpo")(jnp.zeros(10), 4)
    with pytest.raises(ValueError, match=r"shape \(B\*G,\), got shape \(2, 4\)"):
        get_advantage_fn("reinforce")(jnp.zeros((2, 4)), 4)
    with pytest.raises(ValueError, match="group_size=1 is too small"):
        get_advantage_fn("grpo")(jnp.zeros(3), 1)
    with pytest.raises(ValueError, match="group_size=1 is too small"):
        get_advantage_fn("rloo")(jnp.zeros(3), 1)
    with pytest.raises(ValueError, match="ddof=2 is not supported"):
        get_advantage_fn("grpo")(jnp.zeros(4), 4, ddof=2)
    with pytest.raises(TypeError):
        get_advantage_fn("rloo")(jnp.zeros(4), 4, eps=1e-6)


def test_broadcast_to_tokens_fills_valid_tokens_only():
    advantages = jnp.asarray([0.5, -1.0, 2.0])
    mask = jnp.asarray([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(
        broadcast_to_tokens(advantages, mask), [[0.5, 0.5, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    )
    with pytest.raises(ValueError, match="do not match the 3 rows"):
        broadcast_to_tokens(jnp.zeros(2), mask)
