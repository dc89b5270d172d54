"""Train state, gradient accumulation over micro-batches, and the update shared by every training step.

`TrainState` is a pure pytree of arrays; the model's nnx graphdef (structure, config, dtypes) stays outside it and is
closed over by the jitted step, so parameters are always jit arguments, never constants baked into the program.

Mixed precision: parameters are stored in `param_dtype` (fp32 master weights) and cast to the compute dtype inside
the step (`cast_floating`), so the forward runs in bf16 while gradients, optimizer moments and updates stay fp32.
Build the model with `dtype=` the compute dtype, which sets the activation dtype.

Losses follow one contract: `loss_fn(params, batch) -> (loss_sum, count)`. Summing both over micro-batches and
dividing once at the end gives exactly the gradient of the token mean over the whole batch, however the tokens are
spread across micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from cpt_jax import sharding
from cpt_jax.train.optimizer import Optimizer

LossFn = Callable[[nnx.State, Any], tuple[jax.Array, jax.Array]]


@struct.dataclass
class TrainState:
    """Everything that changes during training, as arrays."""

    step: jax.Array  # () int32: updates applied so far
    params: nnx.State  # nnx.Param leaves in the storage dtype
    opt_state: optax.OptState
    rng: jax.Array  # typed PRNG key, for steps that sample


def cast_floating(tree, dtype):
    """`tree` with every floating-point leaf cast to `dtype` (integer leaves untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def create_train_state(model: nnx.Module, optimizer: Optimizer, rng, *, param_dtype=None,
                       layout: sharding.Layout | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """Splits `model` into its graphdef and a fresh `TrainState` at step 0.

    `rng` is a PRNG key or an integer seed; `param_dtype` recasts the stored parameters (e.g. fp32 master weights
    for a model loaded in bf16). The state shares the model's arrays, so a step that donates the state invalidates
    the model; rebuild it with `nnx.merge(graphdef, state.params)`. Raises if the model holds state other than
    `nnx.Param`.

    With `layout`, one jitted program builds the state straight onto the layout's shardings (optimizer moments
    sharded like their parameters, counters and key replicated); the model's parameters, already on the mesh
    (`sharding.init_model`, `load_hf_checkpoint(mesh=...)`), are donated into it.
    """
    graphdef, params = nnx.split(model, nnx.Param)
    key = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else rng

    def build(params, key):
        if param_dtype is not None:
            params = cast_floating(params, param_dtype)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.tx.init(params), rng=key)

    if layout is None:
        return graphdef, build(params, key)
    shardings = layout.shardings("params", jax.eval_shape(build, params, key))
    return graphdef, jax.jit(build, out_shardings=shardings, donate_argnums=(0,),
                             compiler_options=layout.compiler_options)(params, key)


def apply_gradients(state: TrainState, grads: nnx.State, optimizer: Optimizer) -> TrainState:
    """One optimizer update; frozen parameters are passed through untouched (bit-identical)."""
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
    frozen, _ = nnx.split_state(state.params, optimizer.frozen, ...)
    _, trained = nnx.split_state(optax.apply_updates(state.params, updates), optimizer.frozen, ...)
    return state.replace(step=state.step + 1, params=nnx.merge_state(frozen, trained), opt_state=opt_state)


def accumulate_gradients(loss_fn: LossFn, params: nnx.State, micro_batches, *,
                         frozen=nnx.Nothing()) -> tuple[jax.Array, jax.Array, nnx.State]:
    """Sums `(loss_sum, count, grad of loss_sum)` over the leading micro-batch axis of `micro_batches`.

    Micro-batches run sequentially under `lax.scan` (one micro-batch of activations in memory); gradients are
    accumulated in fp32. Parameters matching the nnx filter `frozen` are not differentiated; their entries in the
    returned gradient are zeros.
    """
    fixed, trainable = nnx.split_state(params, frozen, ...)

    def sums_and_grads(micro_batch):
        (loss_sum, count), grads = jax.value_and_grad(
            lambda t: loss_fn(nnx.merge_state(fixed, t), micro_batch), has_aux=True)(trainable)
        return loss_sum.astype(jnp.float32), count.astype(jnp.float32), cast_floating(grads, jnp.float32)

    def fp32_zeros(tree):
        return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), tree)

    if jax.tree.leaves(micro_batches)[0].shape[0] == 1:
        loss_sum, count, grads = sums_and_grads(jax.tree.map(lambda x: x[0], micro_batches))
    else:
        def body(carry, micro_batch):
            return jax.tree.map(jnp.add, carry, sums_and_grads(micro_batch)), None

        zero = jnp.zeros((), jnp.float32)
        (loss_sum, count, grads), _ = jax.lax.scan(body, (zero, zero, fp32_zeros(trainable)), micro_batches)
    return loss_sum, count, nnx.merge_state(fp32_zeros(fixed), grads)


def check_finite(metrics, step: int) -> None:
    """Raises FloatingPointError naming `step` and the quantity if the step's loss or gradient was NaN/Inf.

    Steps report a `finite` flag instead of checking on the host, which would stall the device every step. The
    training loop keeps each step's metrics on device and, when it logs, fetches them all at once and calls this
    for every step since the last log, so the first bad step is named exactly. A bad update is still applied, so the
    parameters stay non-finite from then on and even a loop checking only the logged steps cannot miss it.
    """
    if bool(np.asarray(metrics["finite"])):
        return
    values = {k: float(np.asarray(metrics[k])) for k in ("loss", "grad_norm") if k in metrics}
    bad = [f"{'gradient' if k == 'grad_norm' else k} ({k}={v})" for k, v in values.items() if not np.isfinite(v)]
    raise FloatingPointError(
        f"non-finite {' and '.join(bad) or 'loss or gradient'} at step {step}; the parameters are invalid from this "
        "step on: resume from the last checkpoint with a lower learning rate, tighter clipping (max_grad_norm), "
        "fp32 parameters, or after checking that step's batch")
