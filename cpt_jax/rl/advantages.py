"""Outcome advantage estimators for group-sampled RL (GRPO family), selected by name.

Axes: B prompts, G samples per prompt (the group), BG = B*G flattened rows in which the samples of prompt b are
rows b*G ... b*G+G-1 (the order `generate(num_samples=G)` returns), N sequences, T response tokens.

Every estimator has the signature `fn(rewards_BG, group_size, **options) -> advantages_BG` with keyword-only
options, so a misspelt option fails loudly. Rewards are one scalar per response; `broadcast_to_tokens` spreads
advantages over the response tokens.

How the estimators scale with the reward spread matters for the paper's forgetting argument: "reinforce",
"drgrpo" and "rloo" give updates proportional to the group's reward deviation (so to Var(r)), while "grpo"
divides by the group std and cancels that scale except in zero-variance groups, which give exactly zero.
"""

import jax.numpy as jnp

ADVANTAGE_ESTIMATORS = {}


def register_advantage(name):
    """Decorator adding an estimator `fn(rewards_BG, group_size, **options)` to `ADVANTAGE_ESTIMATORS`."""

    def register(fn):
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered; pick another name")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return register


def get_advantage_fn(name):
    """The estimator registered as `name`."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None


def broadcast_to_tokens(advantages_N, mask_NT):
    """Per-token advantages (N, T): each response's advantage on its valid tokens, zero on padding."""
    if advantages_N.shape != mask_NT.shape[:1]:
        raise ValueError(
            f"advantages of shape {advantages_N.shape} do not match the {mask_NT.shape[0]} rows of the "
            f"response mask {mask_NT.shape}; pass one advantage per response"
        )
    return jnp.where(mask_NT.astype(bool), advantages_N[:, None], 0)


def _grouped(rewards_BG, group_size, min_group_size=1):
    """Rewards as (B, G) in at least float32, after checking the flat layout."""
    if rewards_BG.ndim != 1:
        raise ValueError(f"rewards must be one scalar per response, shape (B*G,), got shape {rewards_BG.shape}")
    if group_size < min_group_size:
        raise ValueError(f"group_size={group_size} is too small for this estimator; use at least {min_group_size}")
    if rewards_BG.shape[0] % group_size:
        raise ValueError(
            f"{rewards_BG.shape[0]} rewards do not split into groups of {group_size}; pass B*G rewards with the "
            "G samples of each prompt in consecutive rows"
        )
    dtype = jnp.promote_types(rewards_BG.dtype, jnp.float32)
    return rewards_BG.astype(dtype).reshape(-1, group_size)


def _centred(rewards_BxG):
    """Rewards minus their group mean, exactly zero in groups whose rewards are all equal.

    Subtracting the group's first reward before averaging makes a constant group all zeros before any
    rounding. Plain `r - mean(r)` leaves round-off: eight float32 rewards of 0.9 give -6e-8 each, which the
    GRPO division by (std + 1e-6) = 1e-6 turns into advantages of -0.06 for a group that carries no signal.
    """
    shifted = rewards_BxG - rewards_BxG[:, :1]
    return shifted - shifted.mean(axis=1, keepdims=True)


@register_advantage("grpo")
def grpo_advantages(rewards_BG, group_size, *, ddof=1, eps=1e-6):
    """(r - mean) / (std + eps) per group; std with `ddof=1` (unbiased, EasyR1/verl) or `ddof=0`."""
    if ddof not in (0, 1):
        raise ValueError(f"ddof={ddof} is not supported; use 1 (unbiased std, EasyR1) or 0 (population std)")
    centred = _centred(_grouped(rewards_BG, group_size, min_group_size=ddof + 1))
    std = jnp.sqrt(jnp.sum(centred**2, axis=1, keepdims=True) / (group_size - ddof))
    return (centred / (std + eps)).reshape(-1)


@register_advantage("drgrpo")
@register_advantage("reinforce")
def mean_baseline_advantages(rewards_BG, group_size):
    """r - mean(group): REINFORCE with the group-mean baseline, which Dr. GRPO also uses (GRPO without std).

    The two names give the same advantages; Dr. GRPO additionally aggregates the loss with
    "seq-mean-token-sum-norm" (see `cpt_jax.rl.losses`).
    """
    return _centred(_grouped(rewards_BG, group_size)).reshape(-1)


@register_advantage("rloo")
def rloo_advantages(rewards_BG, group_size):
    """r_i minus the mean of the other G-1 rewards of its group (REINFORCE leave-one-out)."""
    # r_i - (sum - r_i) / (G - 1) == G / (G - 1) * (r_i - mean), which keeps constant groups exactly zero.
    centred = _centred(_grouped(rewards_BG, group_size, min_group_size=2))
    return (centred * (group_size / (group_size - 1))).reshape(-1)


@register_advantage("remax")
def remax_advantages(rewards_BG, group_size, *, baseline_rewards=None):
    """r minus the reward of the prompt's greedy response, `baseline_rewards` of shape (B,) (ReMax)."""
    rewards_BxG = _grouped(rewards_BG, group_size)
    if baseline_rewards is None:
        raise ValueError("the 'remax' estimator needs baseline_rewards=<(B,) rewards of the greedy responses>")
    baseline_rewards = jnp.asarray(baseline_rewards)
    if baseline_rewards.shape != rewards_BxG.shape[:1]:
        raise ValueError(
            f"baseline_rewards has shape {baseline_rewards.shape}, expected ({rewards_BxG.shape[0]},): one greedy "
            "reward per prompt"
        )
    return (rewards_BxG - baseline_rewards.astype(rewards_BxG.dtype)[:, None]).reshape(-1)

