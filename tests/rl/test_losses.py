"""Policy, KL and entropy losses against hand-written numpy references, on ragged batches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax.rl.losses import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    SumCount,
    aggregate_loss,
    entropy_from_logits,
    get_kl_fn,
    get_loss_aggregation_fn,
    kl_loss,
    kl_loss_sums,
    policy_loss,
    policy_loss_sums,
)

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
MAX_LEN = 10  # the constant divisor of seq-mean-token-sum-norm
LENGTHS = np.array([7, 3, 1, 5, 0, 6])  # ragged, with one all-padding row
N, T = len(LENGTHS), 7
DELTA = 1e-3  # distance from a clip boundary in log-ratio


def np_token_weights(mask, mode):
    """d loss / d token loss for each aggregation mode: the loss is sum(weights * token_losses)."""
    mask = mask.astype(np.float64)
    lengths = mask.sum(-1, keepdims=True)
    num_sequences = np.count_nonzero(lengths)
    if mode == "token-mean":
        return mask / mask.sum()
    if mode == "seq-mean-token-mean":
        return mask / np.maximum(lengths, 1) / num_sequences
    if mode == "seq-mean-token-sum":
        return mask / num_sequences
    if mode == "seq-mean-token-sum-norm":
        return mask / MAX_LEN / num_sequences
    raise AssertionError(mode)


def np_aggregate(loss, mask, mode):
    valid = [row[m] for row, m in zip(loss, mask.astype(bool)) if m.any()]
    if mode == "token-mean":
        return np.concatenate(valid).mean()
    if mode == "seq-mean-token-mean":
        return np.mean([row.mean() for row in valid])
    if mode == "seq-mean-token-sum":
        return np.mean([row.sum() for row in valid])
    return np.mean([row.sum() / MAX_LEN for row in valid])


def np_policy_token_loss(logprobs, old, advantages, clip_low=0.2, clip_high=0.3, dual_clip=3.0, clamp=20.0):
    """Per-token PPO-clip loss and its derivative in log p, written out case by case."""
    log_ratio = logprobs - old
    ratio = np.exp(np.clip(log_ratio, -clamp, clamp))
    loss = np.empty_like(ratio)
    grad = np.empty_like(ratio)
    for index, (r, a, lr) in enumerate(zip(ratio.flat, np.broadcast_to(advantages, ratio.shape).flat, log_ratio.flat)):
        flat_grad = 0.0 if abs(lr) > clamp else -a * r
        if a > 0 and r > 1 + clip_high:
            value, flat_grad = -a * (1 + clip_high), 0.0
        elif a < 0 and r < 1 - clip_low:
            value, flat_grad = -a * (1 - clip_low), 0.0
        elif a < 0 and dual_clip is not None and r > dual_clip:
            value, flat_grad = -a * dual_clip, 0.0
        else:
            value = -a * r
        loss.flat[index], grad.flat[index] = value, flat_grad
    return loss, grad


def _ragged_mask(lengths=LENGTHS, length=T):
    return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


def _policy_inputs(seed, dtype=np.float32):
    """Log-probs whose ratios spread over both clip boundaries and past the dual clip, away from every kink."""
    rng = np.random.default_rng(seed)
    old = -rng.random((N, T)) * 4
    log_ratio = rng.uniform(-2.0, 2.0, (N, T))
    kinks = np.log([0.8, 1.3, 3.0])
    near = np.abs(log_ratio[..., None] - kinks).min(-1) < 0.02
    log_ratio[near] += 0.05
    advantages = np.array([-1.0, 1.0, 0.0, 1.0, 1.0, -1.0]) * rng.uniform(0.5, 2.0, N)
    return old.astype(dtype) + log_ratio.astype(dtype), old.astype(dtype), advantages.astype(dtype)


def test_registries_and_unknown_names():
    assert set(MODES) <= set(LOSS_AGGREGATIONS)
    assert {"k1", "k2", "k3", "low_var_kl"} <= set(KL_ESTIMATORS)
    with pytest.raises(ValueError, match=r"unknown loss aggregation 'seq-mean'.*'token-mean'"):
        get_loss_aggregation_fn("seq-mean")
    with pytest.raises(ValueError, match=r"unknown KL estimator 'kl3'.*'k1'.*'low_var_kl'"):
        get_kl_fn("kl3")


def test_aggregation_small_hand_case():
    loss = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0], [7.0, 8.0, 9.0]])
    mask = jnp.asarray([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    expected = {
        "token-mean": (15.0, 5.0, 3.0),
        "seq-mean-token-mean": (6.5, 2.0, 3.25),
        "seq-mean-token-sum": (15.0, 2.0, 7.5),
        "seq-mean-token-sum-norm": (15.0 / MAX_LEN, 2.0, 0.75),
    }
    for mode, (total, count, mean) in expected.items():
        got = aggregate_loss(loss, mask, mode, max_response_length=MAX_LEN)
        assert isinstance(got, SumCount)
        np.testing.assert_allclose([got.total, got.count, got.mean()], [total, count, mean], rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_on_ragged_batch(mode):
    rng = np.random.default_rng(0)
    mask = _ragged_mask()
    loss = rng.normal(size=(N, T)).astype(np.float32)
    # Non-finite values at padded positions must not reach the loss.
    loss_with_junk = np.where(mask, loss, np.inf).astype(np.float32)
    got = aggregate_loss(jnp.asarray(loss_with_junk), jnp.asarray(mask), mode, max_response_length=MAX_LEN)
    np.testing.assert_allclose(got.mean(), np_aggregate(loss.astype(np.float64), mask, mode), rtol=1e-5)
    expected_count = mask.sum() if mode == "token-mean" else np.count_nonzero(LENGTHS)
    assert float(got.count) == expected_count


def test_empty_batch_aggregates_to_zero():
    for mode in MODES:
        got = aggregate_loss(jnp.ones((2, 3)), jnp.zeros((2, 3)), mode, max_response_length=MAX_LEN)
        assert float(got.count) == 0 and float(got.mean()) == 0


def test_sum_norm_needs_a_constant_length():
    with pytest.raises(ValueError, match="pass the maximum number of generated tokens"):
        aggregate_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="must match"):
        aggregate_loss(jnp.ones((2, 3)), jnp.ones((2, 4)), "token-mean")


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_value_grad_and_metrics_match_numpy(mode):
    logprobs, old, advantages = _policy_inputs(seed=1)
    mask = _ragged_mask()
    token_loss, token_grad = np_policy_token_loss(
        logprobs.astype(np.float64), old.astype(np.float64), advantages.astype(np.float64)[:, None]
    )

    def loss_fn(lp):
        return policy_loss(lp, old, advantages, mask, agg=mode, max_response_length=MAX_LEN)

    (loss, metrics), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(jnp.asarray(logprobs))
    np.testing.assert_allclose(loss, np_aggregate(token_loss, mask, mode), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, token_grad * np_token_weights(mask, mode), rtol=1e-5, atol=1e-8)

    ratio = np.exp(logprobs.astype(np.float64) - old)[mask]
    adv = np.broadcast_to(advantages[:, None], mask.shape)[mask]
    expected = {
        "clip_frac_high": np.mean((adv > 0) & (ratio > 1.3)),
        "clip_frac_low": np.mean((adv < 0) & (ratio < 0.8)),
        "dual_clip_frac": np.mean((adv < 0) & (ratio > 3.0)),
        "approx_kl": np.mean(-np.log(ratio)),
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    # Inputs cover every case, so each metric above is checked against a non-trivial value.
    assert all(expected[name] > 0 for name in ("clip_frac_high", "clip_frac_low", "dual_clip_frac"))


def test_policy_loss_gradient_matches_finite_differences_float64():
    logprobs, old, advantages = _policy_inputs(seed=2, dtype=np.float64)
    mask = _ragged_mask()
    step = 1e-6

    def np_loss(lp):
        return np_aggregate(np_policy_token_loss(lp, old, advantages[:, None])[0], mask, "seq-mean-token-mean")

    expected = np.zeros_like(logprobs)
    for index in np.ndindex(logprobs.shape):
        e = np.zeros_like(logprobs)
        e[index] = step
        expected[index] = (np_loss(logprobs + e) - np_loss(logprobs - e)) / (2 * step)
    with jax.enable_x64(True):
        grad = jax.jit(jax.grad(lambda lp: policy_loss(lp, old, advantages, mask, agg="seq-mean-token-mean")[0]))(
            jnp.asarray(logprobs)
        )
        assert grad.dtype == jnp.float64
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-9)
    assert np.count_nonzero(expected) > 10


def test_clip_boundaries_on_both_sides():
    log_low, log_high, log_dual = math.log(0.8), math.log(1.3), math.log(3.0)
    # (advantage, log-ratio, expected per-token loss, whether the gradient flows)
    cases = [
        (1.0, log_high - DELTA, -math.exp(log_high - DELTA), True),
        (1.0, log_high + DELTA, -1.3, False),  # clipped above: no incentive to push the ratio further
        (1.0, log_low - DELTA, -math.exp(log_low - DELTA), True),  # below 1 - eps with A > 0: never clipped
        (-1.0, log_low + DELTA, math.exp(log_low + DELTA), True),
        (-1.0, log_low - DELTA, 0.8, False),  # clipped below
        (-1.0, log_high + DELTA, math.exp(log_high + DELTA), True),  # above 1 + eps with A < 0: never clipped
        (-1.0, log_dual - DELTA, math.exp(log_dual - DELTA), True),
        (-1.0, log_dual + DELTA, 3.0, False),  # dual clip caps the loss of negative advantages
        (2.0, 0.0, -2.0, True),
    ]
    advantages = jnp.asarray([[c[0] for c in cases]])
    old = jnp.full((1, len(cases)), -1.0)
    logprobs = old + jnp.asarray([[c[1] for c in cases]])
    mask = jnp.ones((1, len(cases)), bool)

    def token_losses(lp):
        loss, metrics = policy_loss_sums(lp, old, advantages, mask)
        return loss.total, metrics

    (total, metrics), grad = jax.jit(jax.value_and_grad(token_losses, has_aux=True))(logprobs)
    per_token = jax.jit(
        jax.vmap(lambda lp, a: policy_loss(lp[None, None], old[:, :1], a[None, None], mask[:, :1])[0])
    )(logprobs[0], advantages[0])
    np.testing.assert_allclose(per_token, [c[2] for c in cases], rtol=1e-6)
    np.testing.assert_allclose(total, sum(c[2] for c in cases), rtol=1e-6)
    for (advantage, log_ratio, _, flows), g in zip(cases, np.asarray(grad[0])):
        if flows:
            np.testing.assert_allclose(g, -advantage * math.exp(log_ratio), rtol=1e-5)
        else:
            assert g == 0
    count = len(cases)
    np.testing.assert_allclose(metrics["clip_frac_high"].mean(), 1 / count, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_low"].mean(), 1 / count, rtol=1e-6)
    np.testing.assert_allclose(metrics["dual_clip_frac"].mean(), 1 / count, rtol=1e-6)


def test_dual_clip_can_be_disabled_and_log_ratio_is_clamped():
    old = jnp.zeros((1, 2))
    logprobs = jnp.asarray([[math.log(3.0) + DELTA, 25.0]])
    mask = jnp.ones((1, 2), bool)

    def total(lp):
        return policy_loss_sums(lp, old, jnp.asarray([-1.0]), mask, dual_clip=None)[0].total

    value, grad = jax.jit(jax.value_and_grad(total))(logprobs)
    np.testing.assert_allclose(value, math.exp(math.log(3.0) + DELTA) + math.exp(20.0), rtol=1e-6)
    np.testing.assert_allclose(grad[0, 0], math.exp(math.log(3.0) + DELTA), rtol=1e-5)
    assert grad[0, 1] == 0  # beyond the clamp
    np.testing.assert_allclose(jax.jit(total)(jnp.asarray([[0.0, 500.0]])), 1.0 + math.exp(20.0), rtol=1e-6)


def test_per_token_advantages_equal_broadcast_sequence_advantages():
    logprobs, old, advantages = _policy_inputs(seed=3)
    mask = _ragged_mask()
    loss_fn = jax.jit(policy_loss)
    per_sequence = loss_fn(logprobs, old, advantages, mask)
    per_token = loss_fn(logprobs, old, np.repeat(advantages[:, None], T, axis=1), mask)
    np.testing.assert_allclose(per_sequence[0], per_token[0], rtol=1e-6)
    with pytest.raises(ValueError, match="fit neither one per sequence"):
        policy_loss(logprobs, old, advantages[:3], mask)


def test_invalid_clip_settings_are_rejected():
    args = (jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones(1), jnp.ones((1, 1)))
    with pytest.raises(ValueError, match="clip_low=1.0 must be in"):
        policy_loss(*args, clip_low=1.0)
    with pytest.raises(ValueError, match="clip_high=-0.1"):
        policy_loss(*args, clip_high=-0.1)
    with pytest.raises(ValueError, match="dual_clip=0.5 must be > 1"):
        policy_loss(*args, dual_clip=0.5)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batch_sums_equal_one_big_batch(mode):
    logprobs, old, advantages = _policy_inputs(seed=4)
    mask = _ragged_mask()
    ref = np.asarray(old) + 0.05

    def micro_batch_sums(lp, old, advantages, mask, ref):
        policy, metrics = policy_loss_sums(lp, old, advantages, mask, agg=mode, max_response_length=MAX_LEN)
        kl = kl_loss_sums(lp, ref, mask, "low_var_kl", mode, max_response_length=MAX_LEN)
        # Both terms share the aggregation mode and mask, hence the normaliser: their totals can be added.
        return policy.total + 0.01 * kl.total, (policy, kl, metrics)

    step = jax.jit(jax.value_and_grad(micro_batch_sums, has_aux=True))
    accumulated, grads = None, []
    # Micro-batches of 10, 6 and 6 valid tokens, the last holding the all-padding row.
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        (_, parts), grad = step(logprobs[rows], old[rows], advantages[rows], mask[rows], ref[rows])
        accumulated = parts if accumulated is None else jax.tree.map(jnp.add, accumulated, parts)
        grads.append(grad)
    policy, kl, metrics = accumulated

    def full_loss(lp):
        policy_value, full_metrics = policy_loss(lp, old, advantages, mask, agg=mode, max_response_length=MAX_LEN)
        kl_value = kl_loss(lp, ref, mask, "low_var_kl", mode, max_response_length=MAX_LEN)
        return policy_value + 0.01 * kl_value, (policy_value, full_metrics)

    (full, (full_policy, full_metrics)), full_grad = jax.jit(jax.value_and_grad(full_loss, has_aux=True))(
        jnp.asarray(logprobs)
    )
    np.testing.assert_allclose(policy.mean() + 0.01 * kl.mean(), full, rtol=1e-6)
    np.testing.assert_allclose(policy.mean(), full_policy, rtol=1e-6)
    np.testing.assert_allclose(jnp.concatenate(grads) / policy.count, full_grad, rtol=1e-5, atol=1e-9)
    for name, value in full_metrics.items():
        np.testing.assert_allclose(metrics[name].mean(), value, rtol=1e-6, atol=1e-8, err_msg=name)
    if mode == "token-mean":
        # Averaging the micro-batch means instead would weigh the ragged micro-batches wrongly.
        chunks = [(0, 2), (2, 4), (4, 6)]
        loss_fn = jax.jit(policy_loss)
        naive = np.mean([loss_fn(logprobs[a:b], old[a:b], advantages[a:b], mask[a:b])[0] for a, b in chunks])
        assert abs(naive - full_policy) > 1e-3


def np_kl(logprobs, ref, estimator):
    d = logprobs - ref
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    clamped = np.clip(-d, -20, 20)
    return np.clip(np.exp(clamped) - clamped - 1, -10, 10)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_estimators_match_numpy_including_clamps(estimator):
    rng = np.random.default_rng(5)
    logprobs = -rng.random((N, T)) * 3
    ref = logprobs + rng.normal(scale=0.5, size=(N, T))
    ref[0, :4] = logprobs[0, :4] + np.array([5.0, -25.0, 30.0, -3.0])  # beyond the value and log-ratio clamps
    got = get_kl_fn(estimator)(jnp.asarray(logprobs, jnp.float32), jnp.asarray(ref, jnp.float32))
    np.testing.assert_allclose(got, np_kl(logprobs, ref, estimator), rtol=2e-5, atol=2e-5)
    mask = _ragged_mask()
    np.testing.assert_allclose(
        kl_loss(logprobs, ref, mask, estimator, "seq-mean-token-mean"),
        np_aggregate(np_kl(logprobs, ref, estimator), mask, "seq-mean-token-mean"),
        rtol=2e-5,
    )


def test_k3_clamps_match_easyr1():
    kl = get_kl_fn("k3")(jnp.zeros(4), jnp.asarray([5.0, 30.0, -30.0, -3.0]))
    # exp(5) - 6 = 142 -> 10; d = 30 -> clamped to 20 -> 10; d = -30 -> -20 -> exp(-20) + 19 -> 10; exp(-3) + 2.
    np.testing.assert_allclose(kl, [10.0, 10.0, 10.0, math.exp(-3) + 2], rtol=1e-6)
    assert get_kl_fn("low_var_kl") is get_kl_fn("k3")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_is_exactly_zero_when_policy_equals_reference(estimator):
    logprobs = jnp.asarray(-np.random.default_rng(6).random((N, T)) * 5, jnp.float32)
    mask = _ragged_mask()
    assert np.all(np.asarray(get_kl_fn(estimator)(logprobs, logprobs)) == 0)
    for mode in MODES:
        assert float(kl_loss(logprobs, logprobs, mask, estimator, mode, max_response_length=MAX_LEN)) == 0
    if estimator != "k1":
        grad = jax.grad(lambda lp: kl_loss(lp, logprobs, mask, estimator))(logprobs)
        assert np.all(np.asarray(grad) == 0)


def test_k3_gradient_is_one_minus_reference_ratio():
    rng = np.random.default_rng(7)
    logprobs = -rng.random((N, T)) * 3
    ref = logprobs + rng.normal(scale=0.5, size=(N, T))
    ref[1, 0] = logprobs[1, 0] + 4.0  # value clamp active: no gradient
    mask = _ragged_mask()
    grad = jax.grad(lambda lp: kl_loss_sums(lp, ref, mask, "k3").total)(jnp.asarray(logprobs, jnp.float32))
    expected = np.where(mask, 1 - np.exp(ref - logprobs), 0)
    expected[1, 0] = 0
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_entropy_from_logits():
    rng = np.random.default_rng(8)
    logits = rng.normal(scale=3.0, size=(2, 3, 11))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = -(probs * np.log(probs)).sum(-1)
    np.testing.assert_allclose(entropy_from_logits(jnp.asarray(logits, jnp.float32)), expected, rtol=1e-5)
    # bf16 logits are computed on in float32: same result as float32 on the rounded logits.
    logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
    got = entropy_from_logits(logits_bf16)
    assert got.shape == (2, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, entropy_from_logits(logits_bf16.astype(jnp.float32)), rtol=1e-6)
    np.testing.assert_allclose(entropy_from_logits(jnp.zeros((4, 7))), np.full(4, math.log(7)), rtol=1e-6)
    assert float(entropy_from_logits(jnp.asarray([0.0, 100.0, 0.0]))) < 1e-30
