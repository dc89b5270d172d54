"""Losses of the RFT update: the PPO-clip policy loss with dual clip, KL penalties, token entropy.

Axes: N sequences (sampled responses), T response tokens, V vocabulary. Masks (N, T) mark the valid response
tokens; values at masked positions never reach a loss, but must be finite for gradients to stay finite.

Exact micro-batching. Every loss and metric is first reduced to a `SumCount(total, count)` and its value is
`total / count`. Adding the SumCounts of micro-batches (`jax.tree.map(jnp.add, a, b)`) and dividing once at the
end gives exactly the value of the whole batch, and, because `count` does not depend on the parameters, summed
gradients of `total` divided by the summed `count` give exactly its gradient. This holds in every aggregation mode
below as long as micro-batches split the batch between sequences, never inside one. (Averaging per-micro-batch
losses instead, as gradient accumulation usually does, is exact only when every micro-batch has the same count.)

Aggregation modes (`LOSS_AGGREGATIONS`, names as in verl), for per-token losses l and mask m:
- "token-mean": sum_{n,t} m l / sum_{n,t} m. Every valid token weighs the same, so longer responses weigh more.
  EasyR1's default and the paper's setting; DAPO's "global token" normalisation. count = number of valid tokens.
- "seq-mean-token-mean": mean over sequences of each sequence's token mean (the original GRPO objective): every
  response weighs the same whatever its length. count = number of sequences.
- "seq-mean-token-sum": mean over sequences of each sequence's token sum. count = number of sequences.
- "seq-mean-token-sum-norm": mean over sequences of the token sum divided by a constant `max_response_length`
  (Dr. GRPO): length-unbiased and with a scale that does not move with the batch. count = number of sequences.
  verl computes the same total but divides by the constant only; the two differ by the factor N.
"Number of sequences" counts only sequences with at least one valid token, so all-padding rows weigh nothing.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class SumCount(NamedTuple):
    """A loss or metric kept as (sum, normaliser); add SumCounts across micro-batches, then take `mean()`."""

    total: jax.Array
    count: jax.Array

    def mean(self):
        """total / count, and 0 when nothing was counted."""
        return self.total / jnp.maximum(self.count, 1)


LOSS_AGGREGATIONS = {}
KL_ESTIMATORS = {}


def _add_to(registry, kind, name):
    def register(fn):
        if name in registry:
            raise ValueError(f"{kind} {name!r} is already registered; pick another name")
        registry[name] = fn
        return fn

    return register


def _look_up(registry, kind, name):
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(registry)}") from None


def register_loss_aggregation(name):
    """Decorator adding `fn(loss_NT, mask_NT, *, max_response_length) -> SumCount` to `LOSS_AGGREGATIONS`."""
    return _add_to(LOSS_AGGREGATIONS, "loss aggregation", name)


def get_loss_aggregation_fn(name):
    """The aggregation registered as `name`."""
    return _look_up(LOSS_AGGREGATIONS, "loss aggregation", name)


def register_kl_estimator(name):
    """Decorator adding `fn(logprobs, ref_logprobs) -> per-token KL estimate` to `KL_ESTIMATORS`."""
    return _add_to(KL_ESTIMATORS, "KL estimator", name)


def get_kl_fn(name):
    """The KL estimator registered as `name`."""
    return _look_up(KL_ESTIMATORS, "KL estimator", name)


def _float(x):
    """x in at least float32: bf16 log-probs are upcast, float64 (tests) is kept."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked(loss_NT, mask_NT):
    """(loss with masked positions zeroed, bool mask); `where` rather than a product so inf * 0 cannot leak."""
    if loss_NT.shape != mask_NT.shape:
        raise ValueError(f"loss of shape {loss_NT.shape} and mask of shape {mask_NT.shape} must match")
    mask_NT = mask_NT.astype(bool)
    return jnp.where(mask_NT, loss_NT, 0), mask_NT


def _num_sequences(mask_NT):
    return jnp.sum(jnp.any(mask_NT, axis=-1), dtype=jnp.float32)


@register_loss_aggregation("token-mean")
def token_mean(loss_NT, mask_NT, *, max_response_length=None):
    """Mean over all valid tokens of the batch."""
    del max_response_length
    loss_NT, mask_NT = _masked(loss_NT, mask_NT)
    return SumCount(jnp.sum(loss_NT), jnp.sum(mask_NT, dtype=jnp.float32))


@register_loss_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(loss_NT, mask_NT, *, max_response_length=None):
    """Mean over sequences of the per-sequence token mean."""
    del max_response_length
    loss_NT, mask_NT = _masked(loss_NT, mask_NT)
    tokens_N = jnp.sum(mask_NT, axis=-1, dtype=loss_NT.dtype)
    per_sequence_N = jnp.sum(loss_NT, axis=-1) / jnp.maximum(tokens_N, 1)
    return SumCount(jnp.sum(per_sequence_N), _num_sequences(mask_NT))


@register_loss_aggregation("seq-mean-token-sum")
def seq_mean_token_sum(loss_NT, mask_NT, *, max_response_length=None):
    """Mean over sequences of the per-sequence token sum."""
    del max_response_length
    loss_NT, mask_NT = _masked(loss_NT, mask_NT)
    return SumCount(jnp.sum(loss_NT), _num_sequences(mask_NT))


@register_loss_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss_NT, mask_NT, *, max_response_length=None):
    """Mean over sequences of the per-sequence token sum / `max_response_length` (a constant, Dr. GRPO)."""
    if max_response_length is None or max_response_length <= 0:
        raise ValueError(
            f"'seq-mean-token-sum-norm' divides by a constant max_response_length, got {max_response_length!r}; "
            "pass the maximum number of generated tokens (e.g. max_new_tokens)"
        )
    loss_NT, mask_NT = _masked(loss_NT, mask_NT)
    return SumCount(jnp.sum(loss_NT) / max_response_length, _num_sequences(mask_NT))


def aggregate_loss(loss_NT, mask_NT, mode="token-mean", *, max_response_length=None):
    """Per-token losses (N, T) reduced over the valid tokens to a `SumCount` with the aggregation `mode`."""
    return get_loss_aggregation_fn(mode)(loss_NT, mask_NT, max_response_length=max_response_length)


@register_kl_estimator("k1")
def kl_k1(logprobs, ref_logprobs):
    """log p - log p_ref: unbiased for KL(p || p_ref) on samples of p, but high variance and often negative."""
    return logprobs - ref_logprobs


@register_kl_estimator("k2")
def kl_k2(logprobs, ref_logprobs):
    """(log p - log p_ref)^2 / 2 (EasyR1's "mse"): biased, but on samples of p its expected gradient is exact."""
    return 0.5 * jnp.square(logprobs - ref_logprobs)


@register_kl_estimator("k3")
@register_kl_estimator("low_var_kl")
def kl_k3(logprobs, ref_logprobs):
    """exp(d) - d - 1 with d = log p_ref - log p: unbiased, non-negative, low variance (EasyR1's "low_var_kl").

    As in EasyR1, d is clamped to [-20, 20] before the exp and the result to [-10, 10], so one token whose
    probability collapsed cannot produce inf or dominate the batch; beyond the clamps the gradient is zero.
    """
    log_ratio = jnp.clip(ref_logprobs - logprobs, -20.0, 20.0)
    return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1, -10.0, 10.0)


def kl_loss_sums(
    logprobs_NT, ref_logprobs_NT, mask_NT, estimator="low_var_kl", agg="token-mean", *, max_response_length=None
):
    """KL penalty to the reference policy as a `SumCount`, per-token estimate `estimator` aggregated by `agg`."""
    kl_NT = get_kl_fn(estimator)(_float(logprobs_NT), _float(ref_logprobs_NT))
    return aggregate_loss(kl_NT, mask_NT, agg, max_response_length=max_response_length)


def kl_loss(
    logprobs_NT, ref_logprobs_NT, mask_NT, estimator="low_var_kl", agg="token-mean", *, max_response_length=None
):
    """KL penalty to the reference policy (scalar); see `kl_loss_sums`."""
    return kl_loss_sums(
        logprobs_NT, ref_logprobs_NT, mask_NT, estimator, agg, max_response_length=max_response_length
    ).mean()


def _check_clip_ranges(clip_low, clip_high, dual_clip):
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low={clip_low} must be in [0, 1): the ratio is clipped below at 1 - clip_low > 0")
    if clip_high < 0:
        raise ValueError(f"clip_high={clip_high} must be >= 0: the ratio is clipped above at 1 + clip_high")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip={dual_clip} must be > 1 (EasyR1 uses 3.0), or None to disable the dual clip")


def policy_loss_sums(
    logprobs_NT,
    old_logprobs_NT,
    advantages,
    mask_NT,
    *,
    clip_low=0.2,
    clip_high=0.3,
    dual_clip=3.0,
    log_ratio_clamp=20.0,
    agg="token-mean",
    max_response_length=None,
):
    """PPO-clip policy loss with dual clip (EasyR1's), as `(SumCount, {metric: SumCount})`; see `policy_loss`."""
    _check_clip_ranges(clip_low, clip_high, dual_clip)
    logprobs_NT, old_logprobs_NT = _float(logprobs_NT), _float(old_logprobs_NT)
    advantages = _float(advantages)
    if advantages.shape == mask_NT.shape[:1]:
        advantages = advantages[:, None]
    elif advantages.shape != mask_NT.shape:
        raise ValueError(
            f"advantages of shape {advantages.shape} fit neither one per sequence {mask_NT.shape[:1]} nor one "
            f"per token {mask_NT.shape}"
        )
    advantages_NT = jnp.broadcast_to(advantages, mask_NT.shape)

    # The clamp keeps exp finite when the policy has drifted far from the sampler (stale or mismatched log-probs).
    log_ratio_NT = jnp.clip(logprobs_NT - old_logprobs_NT, -log_ratio_clamp, log_ratio_clamp)
    ratio_NT = jnp.exp(log_ratio_NT)
    log_low, log_high = math.log1p(-clip_low), math.log1p(clip_high)
    clipped_ratio_NT = jnp.exp(jnp.clip(log_ratio_NT, log_low, log_high))
    loss_NT = jnp.maximum(-advantages_NT * ratio_NT, -advantages_NT * clipped_ratio_NT)
    if dual_clip is not None:
        # For negative advantages the plain PPO loss grows without bound in the ratio; cap it at -A * dual_clip.
        loss_NT = jnp.where(advantages_NT < 0, jnp.minimum(loss_NT, -advantages_NT * dual_clip), loss_NT)
        dual_clipped_NT = (advantages_NT < 0) & (ratio_NT > dual_clip)
    else:
        dual_clipped_NT = jnp.zeros(mask_NT.shape, bool)

    metrics_NT = {
        "clip_frac_high": (advantages_NT > 0) & (log_ratio_NT > log_high),
        "clip_frac_low": (advantages_NT < 0) & (log_ratio_NT < log_low),
        "dual_clip_frac": dual_clipped_NT,
        "approx_kl": -log_ratio_NT,
    }
    metrics = {
        name: jax.lax.stop_gradient(token_mean(value_NT.astype(logprobs_NT.dtype), mask_NT))
        for name, value_NT in metrics_NT.items()
    }
    return aggregate_loss(loss_NT, mask_NT, agg, max_response_length=max_response_length), metrics


def policy_loss(
    logprobs_NT,
    old_logprobs_NT,
    advantages,
    mask_NT,
    *,
    clip_low=0.2,
    clip_high=0.3,
    dual_clip=3.0,
    log_ratio_clamp=20.0,
    agg="token-mean",
    max_response_length=None,
):
    """PPO-clip policy loss with dual clip, as in EasyR1, and its metrics: `(loss, {name: scalar})`.

    Per token, with ratio r = exp(clamp(log p - log p_old, ±log_ratio_clamp)) and advantage A (one per
    sequence, shape (N,), or per token, (N, T)):
        l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)),   and if A < 0:  l = min(l, -A dual_clip);
    `dual_clip=None` disables the cap. The per-token losses are aggregated with `agg` (module docstring);
    "seq-mean-token-sum-norm" needs `max_response_length`.

    Metrics are means over the valid tokens: "clip_frac_high" (A > 0 and r > 1 + clip_high, gradient cut),
    "clip_frac_low" (A < 0 and r < 1 - clip_low, gradient cut), "dual_clip_frac" (A < 0 and r > dual_clip) and
    "approx_kl", the k1 estimate of KL(p_old || p) (EasyR1's "ppo_kl"). EasyR1's "pg_clipfrac_higher" is
    clip_frac_high + clip_frac_low and its "pg_clipfrac_lower" is dual_clip_frac.
    """
    loss, metrics = policy_loss_sums(
        logprobs_NT,
        old_logprobs_NT,
        advantages,
        mask_NT,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        log_ratio_clamp=log_ratio_clamp,
        agg=agg,
        max_response_length=max_response_length,
    )
    return loss.mean(), {name: value.mean() for name, value in metrics.items()}


def entropy_from_logits(logits):
    """Entropy in nats of the softmax over the last axis, computed in float32: (..., V) -> (...).

    Logits must be finite (a -inf logit makes 0 * log 0 = NaN); mask vocabulary entries with a large negative
    value instead.
    """
    log_probs = jax.nn.log_softmax(_float(logits), axis=-1)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
