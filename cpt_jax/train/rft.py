"""The RFT (GRPO-family) update: rollouts -> host rewards -> advantages -> PPO-clip updates with a KL term.

One RFT iteration (DESIGN.md, "data flow of one RFT step"):
  prompt batches --generate (prefill once per prompt, G samples share it)--> tokens, sampler log-probs
  --host: decode, reward--> rewards --device: advantages by group--> old (and reference) log-probs recomputed
  by the trainer --ppo_epochs x mini-batches x micro-batches--> exact token-weighted gradient --> AdamW update.
When every micro-batch feeds exactly one update (ppo_epochs 1, one update per rollout batch), the old log-probs are
not recomputed: the loss's own, without gradient, are the same numbers (`RFTLearner.prepare(on_policy=True)`).

A micro-batch is one prompt batch from the pipeline with its G samples per prompt. The prompt (with its image) runs
through the model once and its G responses attend to its keys/values, so the prompt and the vision tower cost one
row per prompt in training as in sampling, and gradients into the prompt sum over the samples. Micro-batches of one
mini-batch are accumulated as (loss sum, count) pairs, so the update equals the one of a single large batch.

Defaults are the paper's EasyR1 settings (reference/paper.md).

Axis legend: B prompts, G samples per prompt, N = B*G rows, Lp prompt length, T response length, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpt_jax import sharding
from cpt_jax.rl.advantages import get_advantage_fn
from cpt_jax.rl.losses import SumCount, entropy_from_logits, kl_loss_sums, policy_loss_sums
from cpt_jax.train.optimizer import Optimizer
from cpt_jax.train.state import TrainState, apply_gradients


@dataclasses.dataclass(frozen=True)
class RFTConfig:
    num_samples: int = 8
    temperature: float = 1.0
    top_p: float = 0.99
    top_k: int = 0
    max_new_tokens: int = 1024
    reward: str = "math"
    advantage: str = "grpo"
    advantage_options: tuple[tuple[str, Any], ...] = ()  # e.g. (("ddof", 0),)
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float | None = 3.0
    log_ratio_clamp: float = 20.0
    loss_agg: str = "token-mean"
    use_kl: bool = True
    kl_coef: float = 0.01
    kl_estimator: str = "low_var_kl"
    ppo_epochs: int = 1
    micro_batches_per_update: int = 1  # prompt batches per optimizer update (mini-batch = this many micro-batches)

    @classmethod
    def from_config(cls, config) -> "RFTConfig":
        """From an ml_collections ConfigDict or mapping; unknown keys are errors naming them."""
        items = dict(config.items() if hasattr(config, "items") else config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - names)
        if unknown:
            raise ValueError(f"unknown RFT config key(s) {unknown}; known: {sorted(names)}")
        if "advantage_options" in items:
            opts = items["advantage_options"]
            items["advantage_options"] = tuple(sorted((opts.items() if hasattr(opts, "items") else opts)))
        return cls(**items)


def response_positions(prompt_positions_3BL, num_samples: int, length: int):
    """M-RoPE positions (3, N, T) of generated tokens: one past the prompt's last position per axis, then +1."""
    start = jnp.repeat(prompt_positions_3BL[:, :, -1] + 1, num_samples, axis=1)
    return start[..., None] + jnp.arange(length, dtype=start.dtype)


def response_logprobs(graphdef, params, batch, temperature: float):
    """Log-probs (N, T) of the response tokens under the policy (logits / temperature, as the sampler) and the
    per-token entropy (N, T). `batch`: prompt input_ids/attention_mask/position_ids/vision (B rows), response and
    response_mask (N rows).

    The (left-padded) prompt runs once per group, not once per sample: the g = N // B responses of a prompt attend
    to its keys/values (`TextDecoder.extend`), so a step costs B prompt rows + N response rows instead of N full
    rows, with the same result as running each [prompt, response] row through the model.
    """
    model = nnx.merge(graphdef, params)
    lm = model.language_model
    b = batch["input_ids"].shape[0]
    response = batch["response"]
    n, t = response.shape
    g = n // b
    h_prompt, (k, v) = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                           batch.get("vision"))
    # The last prompt position predicts response token 0; response tokens 0..T-2 predict tokens 1..T-1.
    h = jnp.repeat(h_prompt[:, -1:], g, axis=0)
    if t > 1:
        sees = jnp.tril(jnp.ones((t - 1, t - 1), bool))[None] & batch["response_mask"][:, None, :-1].astype(bool)
        h_response, _ = lm.extend(lm.embed(response[:, :-1]), response_positions(batch["position_ids"], g, t - 1),
                                  k, v, batch["attention_mask"].astype(bool), sees, remat=lm.remat)
        h = jnp.concatenate([h, h_response], axis=1)
    logits = model.logits(h).astype(jnp.float32) / temperature
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), response[..., None], axis=-1)[..., 0]
    return logp, entropy_from_logits(logits)


def rft_loss(graphdef, params, batch, config: RFTConfig, *, max_response_length: int | None = None):
    """(loss sum, count, metric sums) of one micro-batch: PPO-clip policy loss + kl_coef * KL to the reference.

    `batch["row_weight"]` (N,) scales each row (1 in training; the diagnostics isolate one group with it).
    """
    logp, entropy = response_logprobs(graphdef, params, batch, config.temperature)
    mask = batch["response_mask"].astype(jnp.float32) * batch["row_weight"][:, None]
    # An on-policy micro-batch (see `RFTLearner.prepare`) has no old log-probs: the parameters being differentiated
    # sampled it, so the policy's own log-probs without gradient are the old ones and the ratio is exactly 1.
    old = batch["old_logprobs"] if "old_logprobs" in batch else jax.lax.stop_gradient(logp)
    policy, metrics = policy_loss_sums(
        logp, old, batch["advantages"], mask, clip_low=config.clip_low,
        clip_high=config.clip_high, dual_clip=config.dual_clip, log_ratio_clamp=config.log_ratio_clamp,
        agg=config.loss_agg, max_response_length=max_response_length)
    total = policy.total
    metrics = dict(metrics, entropy=SumCount(jnp.sum(entropy * mask), jnp.sum(mask)))
    if "sampler_logprobs" in batch:
        # The old log-probs come from the parameters that sampled: ~0 unless the two code paths disagree numerically.
        metrics["sampler_logprob_gap"] = SumCount(jnp.sum(jnp.abs(old - batch["sampler_logprobs"]) * mask),
                                                  jnp.sum(mask))
    if config.use_kl:
        kl = kl_loss_sums(logp, batch["ref_logprobs"], mask, config.kl_estimator, config.loss_agg,
                          max_response_length=max_response_length)
        total = total + config.kl_coef * kl.total
        metrics["kl"] = kl
    metrics["policy_loss"] = policy
    return total, policy.count, metrics


class RFTLearner:
    """Jitted pieces of the RFT update around a fixed graphdef and config.

    The loss, gradient and log-prob programs are built once and compile once per distinct micro-batch shape (the
    data pipeline's length and patch buckets bound their number), however many tasks and optimizers follow. With
    `layout`, every program takes the shardings `sharding.PROGRAMS` declares for it.
    """

    def __init__(self, graphdef, config: RFTConfig, *, max_response_length=None,
                 layout: sharding.Layout | None = None):
        self.graphdef = graphdef
        self.config = config
        self.layout = layout
        self.max_response_length = max_response_length or config.max_new_tokens
        self.advantage_fn = get_advantage_fn(config.advantage)
        temperature = config.temperature

        def loss(params, batch):
            total, count, metrics = rft_loss(graphdef, params, batch, config,
                                             max_response_length=self.max_response_length)
            return total, (count, metrics)

        def weighted_total(params, batch, row_weight):
            return loss(params, dict(batch, row_weight=row_weight * batch["row_weight"]))[0]

        def logprobs(params, batch):
            return response_logprobs(graphdef, params, batch, temperature)[0]

        def accumulate(total, micro_batch):
            return jax.tree.map(jnp.add, total, micro_batch)

        self.logprobs = sharding.jit(logprobs, "rft_logprobs", layout)
        self.grad = sharding.jit(jax.value_and_grad(loss, has_aux=True), "rft_grad", layout)
        # Gradient of the loss summed over a subset of rows (diagnostics: one group's contribution).
        self.row_grad = sharding.jit(jax.grad(weighted_total), "rft_row_grad", layout)
        self._add = sharding.jit(accumulate, "rft_accumulate", layout)
        self._apply_fns = {}

    def _apply_fn(self, optimizer: Optimizer):
        if id(optimizer) not in self._apply_fns:
            def apply(state: TrainState, grads, total, count):
                grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
                grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
                loss = total / jnp.maximum(count, 1.0)
                new_state = apply_gradients(state, grads, optimizer)
                finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                                   "lr": optimizer.learning_rate(state.step)}

            self._apply_fns = {id(optimizer): (optimizer, sharding.jit(apply, "rft_apply", self.layout))}
        return self._apply_fns[id(optimizer)][1]

    def advantages(self, rewards_N) -> jax.Array:
        return self.advantage_fn(jnp.asarray(rewards_N, jnp.float32), self.config.num_samples,
                                 **dict(self.config.advantage_options))

    def prepare(self, params, ref_params, prompts: dict, tokens, lengths, rewards, *, on_policy: bool = False,
                sampler_logprobs=None) -> dict:
        """The update inputs of one micro-batch: response masks, advantages, old (and reference) log-probs.

        `prompts`, `tokens`, `lengths` and `rewards` are host arrays; with a layout, this process's rows (whole
        groups), assembled here into the global batch. `on_policy=True` promises that the micro-batch is used once,
        by the update that differentiates `params` (ppo_epochs 1, one update per rollout batch): the old log-probs
        are then the loss's own (ratio 1), which saves a forward pass per micro-batch, as TRL does. With
        `sampler_logprobs` (N, T), the update reports the mean |old - sampler| log-prob gap (`sampler_logprob_gap`).
        """
        tokens = np.asarray(tokens)
        response_mask = (np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
        batch = dict(prompts, response=tokens, response_mask=response_mask,
                     advantages=np.asarray(self.advantages(rewards)),
                     row_weight=np.ones(tokens.shape[0], np.float32))
        if sampler_logprobs is not None:
            batch["sampler_logprobs"] = sampler_logprobs  # may stay on device: no wait for the sampler here
        batch = jax.device_put(batch) if self.layout is None else sharding.global_batch(batch, self.layout)
        if not on_policy:
            batch["old_logprobs"] = self.logprobs(params, batch)
        if self.config.use_kl:
            batch["ref_logprobs"] = self.logprobs(ref_params, batch)
        return batch

    def update(self, state: TrainState, micro_batches: Sequence[dict], optimizer: Optimizer):
        """One optimizer update from several micro-batches, exactly as one batch (sums, then one division)."""
        acc = None
        for batch in micro_batches:
            (total, (count, metrics)), grads = self.grad(state.params, batch)
            step = (grads, total, count, metrics)
            acc = step if acc is None else self._add(acc, step)
        grads, total, count, metric_sums = acc
        state, metrics = self._apply_fn(optimizer)(state, grads, total, count)
        metrics.update({k: v.total / jnp.maximum(v.count, 1.0) for k, v in metric_sums.items()})
        return state, metrics


def rollout_metrics(scores: Sequence[dict], lengths) -> dict[str, float]:
    """Host-side rollout metrics: reward mean/std, accuracy, format rate, response length."""
    overall = np.array([s["overall"] for s in scores])
    out = {"reward_mean": float(overall.mean()), "reward_std": float(overall.std()),
           "accuracy": float(np.mean([s["accuracy"] for s in scores])),
           "format_rate": float(np.mean([s["format"] for s in scores])),
           "response_length": float(np.mean(lengths))}
    return out
