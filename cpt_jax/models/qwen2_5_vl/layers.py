"""Building blocks shared by the vision tower and the text decoder.

Parameters carry logical axis names (`out_sharding` metadata) and activations are pinned at layer boundaries with
`constrain(x, logical_names)`; `sharding.py` maps both to mesh axes. Layer code never names a mesh axis.
Axis legend: B batch, L query length, S key length, D model dim, H heads, K kv heads, R = H/K, Dh head dim, F MLP dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from cpt_jax.models.qwen2_5_vl.sharding import constrain

Dtype = jnp.dtype

# transformers initialises every Linear/Embedding with N(0, initializer_range=0.02); biases 0, norm scales 1.
default_init = nnx.initializers.normal(0.02)

# Logical axes of the activations pinned at layer boundaries.
ACT_BLD = ("act_batch", "act_length", "act_embed")
ACT_ND = ("act_patches", "act_vis_embed")
ACT_LBSKD = ("layers", "act_batch", "act_kv_length", "act_kv_heads", None)


def param(rngs: nnx.Rngs | None, shape, names, dtype, init=default_init) -> nnx.Param:
    """A parameter with logical axis names; created lazily-sharded so it works with and without a mesh."""
    value = init(rngs.params(), shape, dtype) if rngs is not None else jnp.zeros(shape, dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def ones_param(shape, names, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), out_sharding=tuple(names), eager_sharding=False)


def zeros_param(shape, names, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=tuple(names), eager_sharding=False)


class RMSNorm(nnx.Module):
    """RMSNorm in fp32; the weight multiplies after casting back to the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float, axis: str, *, dtype: Dtype, param_dtype: Dtype):
        self.eps = eps
        self.dtype = dtype
        self.scale = ones_param((dim,), (axis,), param_dtype)

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


# XLA:CPU runs a dot with the contracted axis minor-most in both operands. JAX's transpose rule computes a kernel's
# gradient as dy^T x, so for a widening layer (q/k/v, gate, up: out > in) it transposes the large dy, a strided copy
# fused with the elementwise backward, a quarter of the 40m SFT step. `_einsum` picks the transposed operand by
# size: x^T dy when the layer widens, dy^T x otherwise. Under a remat policy the plain einsum stays: a custom VJP
# hides its dots from `checkpoint_dots`-style policies, which would then recompute them.
_UNDER_REMAT = contextvars.ContextVar("cpt_jax_under_remat", default=False)


@contextlib.contextmanager
def _under_remat():
    token = _UNDER_REMAT.set(True)
    try:
        yield
    finally:
        _UNDER_REMAT.reset(token)


def _explicit(spec: str, ndim: int) -> tuple[str, str, str]:
    """(x, kernel, out) subscripts of `spec` with a leading '...' spelled out for an x of `ndim` axes."""
    ins, out = spec.split("->")
    x, w = ins.split(",")
    if "..." in x:
        free = "ABCDEFGHIJ"[:ndim - (len(x) - 3)]
        x, out = x.replace("...", free), out.replace("...", free)
    return x, w, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum(spec: str, x, w):
    return jnp.einsum(spec, x, w)


def _einsum_fwd(spec, x, w):
    return jnp.einsum(spec, x, w), (x, w)


def _einsum_bwd(spec, residuals, dy):
    x, w = residuals
    xs, ws, out = _explicit(spec, x.ndim)
    dx = jnp.einsum(f"{out},{ws}->{xs}", dy, w)
    size_in = math.prod(n for n, c in zip(x.shape, xs) if c in ws)
    size_out = math.prod(n for n, c in zip(dy.shape, out) if c in ws)
    dw = jnp.einsum(f"{xs},{out}->{ws}", x, dy) if size_in <= size_out else jnp.einsum(f"{out},{xs}->{ws}", dy, x)
    return dx, dw


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), with the kernel in any (in..., out...) layout via an explicit einsum spec."""

    def __init__(self, shape, names, *, bias_shape=None, bias_names=None, spec: str, rngs: nnx.Rngs | None,
                 dtype: Dtype, param_dtype: Dtype):
        self.spec = spec
        self.dtype = dtype
        self.kernel = param(rngs, shape, names, param_dtype)
        self.bias = zeros_param(bias_shape, bias_names, param_dtype) if bias_shape is not None else None

    def __call__(self, x):
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        y = jnp.einsum(self.spec, x, kernel) if _UNDER_REMAT.get() else _einsum(self.spec, x, kernel)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def dense(d_in: int, d_out: int, names, *, bias: bool, rngs, dtype, param_dtype) -> Linear:
    return Linear((d_in, d_out), names, bias_shape=(d_out,) if bias else None, bias_names=names[1:],
                  spec="...i,io->...o", rngs=rngs, dtype=dtype, param_dtype=param_dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)); biases in the vision tower, none in the text decoder."""

    def __init__(self, dim: int, hidden: int, embed_axis: str, mlp_axis: str, *, bias: bool, rngs, dtype,
                 param_dtype):
        kw = dict(bias=bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = dense(dim, hidden, (embed_axis, mlp_axis), **kw)
        self.up_proj = dense(dim, hidden, (embed_axis, mlp_axis), **kw)
        self.down_proj = dense(hidden, dim, (mlp_axis, embed_axis), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    return x * cos + rotate_half(x) * sin


# --- attention ---------------------------------------------------------------------------------------------------
# An implementation takes q (B, L, H, Dh), k and v (B, S, K, Dh) and a boolean mask broadcastable to (B, L, S)
# (True = attend) and returns (B, L, H, Dh). GQA: kv head j serves q heads j*R .. j*R+R-1.

AttentionFn = Callable[..., jax.Array]
ATTENTION_IMPLS: dict[str, AttentionFn] = {}


def register_attention(name: str):
    def deco(fn):
        ATTENTION_IMPLS[name] = fn
        return fn
    return deco


def get_attention(name: str) -> AttentionFn:
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {sorted(ATTENTION_IMPLS)}")
    return ATTENTION_IMPLS[name]


def attention_scores(q_BLHD, k_BSKD):
    """Scaled scores (B, K, R, L, S) in fp32."""
    b, l, h, dh = q_BLHD.shape
    kv = k_BSKD.shape[2]
    q_BLKRD = q_BLHD.reshape(b, l, kv, h // kv, dh)
    s = jnp.einsum("blkrd,bskd->bkrls", q_BLKRD, k_BSKD, preferred_element_type=jnp.float32)
    return s * (1.0 / math.sqrt(dh))


def masked_softmax(s, mask):
    """Softmax in fp32 with masked entries at the dtype minimum (fully masked rows stay finite, as in eager HF)."""
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(s, axis=-1)


def attention_output(p_BKRLS, v_BSKD):
    b, kv, r, l, _ = p_BKRLS.shape
    o = jnp.einsum("bkrls,bskd->blkrd", p_BKRLS.astype(v_BSKD.dtype), v_BSKD)
    return o.reshape(b, l, kv * r, v_BSKD.shape[-1])


def prefix_attention(q_NTHD, k_NTKD, v_NTKD, k_BSKD, v_BSKD, prefix_mask_BS, self_mask_NTT):
    """New tokens attending to a shared prefix and to each other, without copying the prefix per row.

    Row n of the N = B*g new-token rows continues prefix row n // g: the g rows of a group (a prompt's samples, or
    g=1 in cached decoding) read one prefix k/v (B, S, K, Dh) whose gradient sums over them. One fp32 softmax over
    [prefix slots, new tokens]; `self_mask_NTT` (N, T, T) says which new tokens each new token sees.
    """
    n, t, h, dh = q_NTHD.shape
    b, _, kv, _ = k_BSKD.shape
    g, r = n // b, h // kv
    q = q_NTHD.reshape(b, g, t, kv, r, dh)
    k_self, v_self = (x.reshape(b, g, t, kv, dh) for x in (k_NTKD, v_NTKD))
    scale = 1.0 / math.sqrt(dh)
    s_prefix = jnp.einsum("bgtkrd,bskd->bkrgts", q, k_BSKD, preferred_element_type=jnp.float32) * scale
    s_self = jnp.einsum("bgtkrd,bgukd->bkrgtu", q, k_self, preferred_element_type=jnp.float32) * scale
    s = k_BSKD.shape[1]
    mask = jnp.concatenate([jnp.broadcast_to(prefix_mask_BS[:, None, None, :], (b, g, t, s)),
                            self_mask_NTT.reshape(b, g, t, t)], -1)[:, None, None]
    p = masked_softmax(jnp.concatenate([s_prefix, s_self], -1), mask).astype(v_BSKD.dtype)
    o = (jnp.einsum("bkrgts,bskd->bgtkrd", p[..., :s], v_BSKD)
         + jnp.einsum("bkrgtu,bgukd->bgtkrd", p[..., s:], v_self))
    return o.reshape(n, t, h, dh)


@register_attention("xla")
def xla_attention(q_BLHD, k_BSKD, v_BSKD, mask):
    """Plain XLA attention: explicit scores, fp32 softmax, cast to the value dtype before the value product."""
    p = masked_softmax(attention_scores(q_BLHD, k_BSKD), mask[:, None, None])
    return attention_output(p, v_BSKD)


# --- rematerialisation ---------------------------------------------------------------------------------------------

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(fn, policy: str):
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose one of {sorted(REMAT_POLICIES)}")
    if policy == "none":
        return fn

    def traced(*args):
        with _under_remat():
            return fn(*args)

    return jax.checkpoint(traced, policy=REMAT_POLICIES[policy], prevent_cse=False)


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs | None):
    """n copies of a layer with parameters stacked on a leading 'layers' axis (for `lax.scan` over layers)."""
    if rngs is None:
        rngs = nnx.Rngs(0)

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r):
        return make_layer(r)

    return create(rngs)


def scan_layers(layers: nnx.Module, body, carry, xs=None, *, carry_axes, remat: str = "none"):
    """`lax.scan` over stacked layers: `body(layer, carry, x) -> (carry, y)` with the layer rebuilt per step.

    The carry (the residual stream) is constrained to its logical axes `carry_axes` before and after every layer.
    """
    graphdef, state = nnx.split(layers)

    def step(c, inputs):
        layer_state, x = inputs
        c, y = body(nnx.merge(graphdef, layer_state), c, x)
        return constrain(c, carry_axes), y

    return jax.lax.scan(maybe_remat(step, remat), constrain(carry, carry_axes), (state, xs))
