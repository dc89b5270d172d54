"""Supervised fine-tuning: token-level cross entropy on the answer tokens and the jitted SFT step.

Batch (a dict of arrays; B rows of length L):
  input_ids       (B, L) int32   prompt + answer, image pads expanded
  attention_mask  (B, L)         1 on real tokens, 0 on padding
  position_ids    (3, B, L) int32 M-RoPE positions (`get_rope_index`, host-side)
  loss_mask       (B, L)         1 on the tokens to learn (the answer turn), 0 on prompt, image and padding tokens;
                                 aligned with input_ids, as `data.prompts.encode_sft_example` produces it
  vision          VisionInputs or None (`vision_inputs`, host-side)
Logits at position i predict input_ids[i + 1], so token i + 1 counts when loss_mask[i + 1] is set.

For k micro-batches every leaf gets a leading axis of size k (`stack_micro_batches`; input_ids (k, B, L)); each
micro-batch brings its own images. The step sums (nll, token count, gradient of the nll sum) over the micro-batches
and divides once, which equals one step on the concatenated batch.

Axis legend: B batch, L length, D model dim, V vocab, N flattened tokens, C tokens per logits chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cpt_jax import sharding
from cpt_jax.train.optimizer import Optimizer
from cpt_jax.train.state import TrainState, accumulate_gradients, apply_gradients, cast_floating

BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "loss_mask")


def token_log_probs(logits_fn: Callable[[jax.Array], jax.Array], h_BLD, targets_BL, *,
                    chunk_size: int | None = None):
    """log p(targets) (B, L) in fp32 from final hidden states, the softmax taken in fp32.

    With `chunk_size`, logits are computed for `chunk_size` tokens at a time and recomputed in the backward pass, so
    the (B, L, V) logits never exist at once (for a 152k vocabulary they dominate activation memory).
    """
    b, l, d = h_BLD.shape

    def log_probs(h_ND, t_N):
        logits_NV = logits_fn(h_ND).astype(jnp.float32)
        picked = jnp.take_along_axis(logits_NV, t_N[:, None], axis=-1)[:, 0]
        return picked - jax.nn.logsumexp(logits_NV, axis=-1)

    n = b * l
    if chunk_size is None or chunk_size >= n:
        return log_probs(h_BLD.reshape(n, d), targets_BL.reshape(n)).reshape(b, l)
    pad = -n % chunk_size
    h_ND = jnp.pad(h_BLD.reshape(n, d), ((0, pad), (0, 0)))
    t_N = jnp.pad(targets_BL.reshape(n), (0, pad))
    chunk_fn = jax.checkpoint(lambda xs: log_probs(*xs))
    logp = jax.lax.map(chunk_fn, (h_ND.reshape(-1, chunk_size, d), t_N.reshape(-1, chunk_size)))
    return logp.reshape(-1)[:n].reshape(b, l)


def _check_batch(batch):
    if missing := [k for k in BATCH_KEYS if k not in batch]:
        raise KeyError(f"SFT batch lacks {missing}; it needs {list(BATCH_KEYS)} and optionally 'vision'")


def sft_loss(graphdef: nnx.GraphDef, params: nnx.State, batch, *,
             logits_chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of token negative log-likelihoods, number of loss tokens), both fp32, over the `loss_mask` tokens."""
    _check_batch(batch)
    model = nnx.merge(graphdef, params)
    ids_BL, mask_BL = batch["input_ids"], batch["attention_mask"]
    h_BLD, _ = model.hidden_states(ids_BL, mask_BL, batch["position_ids"], batch.get("vision"))
    targets_BL = jnp.pad(ids_BL[:, 1:], ((0, 0), (0, 1)))
    # Padding never counts, even if a pipeline marked it.
    weight_BL = (batch["loss_mask"] * mask_BL).astype(jnp.float32)
    weight_BL = jnp.pad(weight_BL[:, 1:], ((0, 0), (0, 1)))
    logp_BL = token_log_probs(model.logits, h_BLD, targets_BL, chunk_size=logits_chunk)
    return -jnp.sum(weight_BL * logp_BL), jnp.sum(weight_BL)


def stack_micro_batches(batches: Sequence):
    """k batches of identical shapes -> one batch whose leaves have a leading micro-batch axis of size k."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)


def make_sft_step(graphdef: nnx.GraphDef, optimizer: Optimizer, *, compute_dtype=None,
                  logits_chunk: int | None = None, layout: sharding.Layout | None = None):
    """The jitted SFT step `sft_step(state, batch) -> (state, metrics)`; the state is donated.

    With `layout`, the state and batch take its shardings (`sharding.PROGRAMS["sft_step"]`); pass global arrays
    (`sharding.global_batch`) when running on several processes.

    `compute_dtype` (e.g. bf16) casts the parameters for the forward pass while the state keeps its storage dtype.
    `batch` is one batch or k micro-batches stacked on a leading axis. Metrics (device scalars): loss (token mean),
    tokens, grad_norm (before clipping), lr, finite (False if the loss or a gradient was NaN/Inf; pass the metrics
    to `state.check_finite` when logging).
    """

    def loss_fn(params, batch):
        if compute_dtype is not None:
            params = cast_floating(params, compute_dtype)
        return sft_loss(graphdef, params, batch, logits_chunk=logits_chunk)

    def sft_step(state: TrainState, batch):
        _check_batch(batch)
        rank = batch["input_ids"].ndim
        if rank not in (2, 3):
            raise ValueError(f"input_ids has shape {batch['input_ids'].shape}; expected (B, L), or (k, B, L) for k "
                             "micro-batches (stack_micro_batches)")
        micro_batches = batch if rank == 3 else jax.tree.map(lambda x: x[None], batch)
        loss_sum, count, grad_sum = accumulate_gradients(loss_fn, state.params, micro_batches,
                                                         frozen=optimizer.frozen)
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grad_sum)
        loss, grad_norm = loss_sum / denominator, optax.tree.norm(grads)
        metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm, "lr": optimizer.learning_rate(state.step),
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
        return apply_gradients(state, grads, optimizer), metrics

    return sharding.jit(sft_step, "sft_step", layout)
