"""Qwen2.5-VL vision tower: patch embedding, 2D rotary, window/full attention blocks, patch merger.

The data-dependent parts (window grouping, per-image segments, positions) are computed host-side in numpy from
`grid_thw` by `vision_inputs`, padded to a static patch count, so the jitted tower sees fixed shapes only. Patches of
all images in a batch are flattened into one sequence; attention stays inside a segment (a window, or a whole frame
for the `fullatt_block_indexes` blocks), expressed as a mask from segment ids.

Axis legend: N patches (padded), M merged tokens = N / U, U = merge unit (4), Dv vision width, Hv heads, Dh head dim,
C patch vector (in_channels * temporal_patch * patch**2), O output width (= text hidden).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from cpt_jax.models.qwen2_5_vl.config import VisionConfig
from cpt_jax.models.qwen2_5_vl.layers import (ACT_ND, RMSNorm, SwiGLU, Linear, apply_rotary, dense, get_attention,
                                              param, scan_layers, stacked)


@struct.dataclass
class VisionInputs:
    """Static-shape inputs of the vision tower (see `vision_inputs`). All arrays are padded to N patches."""

    pixel_values: jax.Array  # (N, C) in the processor's row order, zero rows after the real patches
    patch_order: jax.Array  # (N,) int32: row of pixel_values placed at each window-ordered slot
    hw_N2: jax.Array  # (N, 2) int32 (h, w) patch coordinates, window order
    window_seg: jax.Array  # (N,) int32 window id per slot, -1 on padding
    frame_seg: jax.Array  # (N,) int32 frame id (full-attention segment) per slot, -1 on padding
    unpermute: jax.Array  # (M,) int32: window-ordered merged token holding image-order merged token m


def window_index(grid_thw, config: VisionConfig):
    """Window permutation in merged-token units and cumulative window lengths in patches (as transformers)."""
    ws = config.window_size // config.spatial_merge_size // config.patch_size
    unit = config.merge_unit
    index, cu, offset = [], [0], 0
    for t, h, w in np.asarray(grid_thw, np.int64):
        lh, lw = h // config.spatial_merge_size, w // config.spatial_merge_size
        idx = np.arange(t * lh * lw).reshape(t, lh, lw)
        # transformers pads by a whole window when the side already divides; empty windows are dropped below.
        pad_h, pad_w = ws - lh % ws, ws - lw % ws
        nh, nw = (lh + pad_h) // ws, (lw + pad_w) // ws
        padded = np.pad(idx, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, ws * ws)
        counts = (padded != -100).sum(-1).reshape(-1)
        index.append(padded[padded != -100] + offset)
        cu.extend((np.cumsum(counts) * unit + cu[-1]).tolist())
        offset += t * lh * lw
    index = np.concatenate(index) if index else np.zeros((0,), np.int64)
    cu = np.array(cu, np.int64)
    keep = np.concatenate([[True], cu[1:] != cu[:-1]])  # unique_consecutive
    return index, cu[keep]


def patch_positions(grid_thw, merge: int) -> np.ndarray:
    """(h, w) coordinates per patch in the processor's row order (2x2 merge blocks contiguous)."""
    out = []
    for t, h, w in np.asarray(grid_thw, np.int64):
        hp, wp = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = [a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1) for a in (hp, wp)]
        out.append(np.tile(np.stack(blocks, -1), (t, 1)))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def num_patches(grid_thw) -> int:
    return int(np.prod(np.asarray(grid_thw, np.int64).reshape(-1, 3), axis=-1).sum())


def vision_inputs(pixel_values, grid_thw, config: VisionConfig, pad_to: int | None = None) -> VisionInputs:
    """Host-side (numpy) metadata for `VisionTower`, padded to `pad_to` patches (a multiple of the merge unit).

    `pixel_values` are rows in the HF processor layout (N_real, C); `grid_thw` has one (t, h, w) row per image.
    """
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    pixel_values = np.asarray(pixel_values)
    unit, merge = config.merge_unit, config.spatial_merge_size
    if np.any(grid_thw[:, 1:] % merge):
        raise ValueError(f"image_grid_thw {grid_thw.tolist()}: h and w must be multiples of spatial_merge_size {merge}")
    n = num_patches(grid_thw)
    if pixel_values.shape != (n, config.patch_dim):
        raise ValueError(f"pixel_values has shape {pixel_values.shape}, expected ({n}, {config.patch_dim}) for "
                         f"image_grid_thw {grid_thw.tolist()}")
    pad_to = n if pad_to is None else pad_to
    if pad_to < n or pad_to % unit:
        raise ValueError(f"pad_to={pad_to} must be >= {n} patches and a multiple of {unit}; raise the patch bucket")
    win_idx, cu = window_index(grid_thw, config)
    order = (win_idx[:, None] * unit + np.arange(unit)).reshape(-1)
    window_seg = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
    frame_ids = np.repeat(np.arange(int(grid_thw[:, 0].sum())), [h * w for t, h, w in grid_thw for _ in range(t)])
    pos = patch_positions(grid_thw, merge)

    pad = pad_to - n
    order_padded = np.concatenate([order, np.arange(n, pad_to)])
    merged_pad = pad // unit
    unperm = np.concatenate([np.argsort(win_idx), np.arange(n // unit, n // unit + merged_pad)])
    return VisionInputs(
        pixel_values=np.concatenate([pixel_values, np.zeros((pad, pixel_values.shape[1]), pixel_values.dtype)]),
        patch_order=order_padded.astype(np.int32),
        hw_N2=np.concatenate([pos[order], np.zeros((pad, 2), np.int64)]).astype(np.int32),
        window_seg=np.concatenate([window_seg, np.full(pad, -1)]).astype(np.int32),
        frame_seg=np.concatenate([frame_ids[order], np.full(pad, -1)]).astype(np.int32),
        unpermute=unperm.astype(np.int32),
    )


def segment_mask(seg_N):
    return (seg_N[:, None] == seg_N[None, :]) & (seg_N[:, None] >= 0)


def vision_rotary(hw_N2, head_dim: int, theta: float):
    """2D rotary angles in fp32: the first half of the frequencies rotate with h, the second with w."""
    dim = head_dim // 2
    inv = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    f = jnp.concatenate([hw_N2[:, :1].astype(jnp.float32) * inv, hw_N2[:, 1:].astype(jnp.float32) * inv], -1)
    emb = jnp.concatenate([f, f], -1)
    return jnp.cos(emb), jnp.sin(emb)


class VisionAttention(nnx.Module):
    def __init__(self, config: VisionConfig, *, attention: str, rngs, dtype, param_dtype):
        d, h, dh = config.hidden_size, config.num_heads, config.head_dim
        self.dtype = dtype
        self.attention = attention
        # Fused q|k|v like the checkpoint (3*D rows = [q heads | k heads | v heads]).
        self.qkv = Linear((d, 3, h, dh), ("vis_embed", None, "vis_heads", "vis_head_dim"), bias_shape=(3, h, dh),
                          bias_names=(None, "vis_heads", "vis_head_dim"), spec="nd,dthk->nthk", rngs=rngs,
                          dtype=dtype, param_dtype=param_dtype)
        self.proj = Linear((h, dh, d), ("vis_heads", "vis_head_dim", "vis_embed"), bias_shape=(d,),
                           bias_names=("vis_embed",), spec="nhk,hkd->nd", rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)

    def __call__(self, x_ND, cos, sin, mask_NN):
        qkv = self.qkv(x_ND)
        # Rotary in fp32 then back to the compute dtype, as transformers' vision tower does.
        q, k = (apply_rotary(qkv[:, i].astype(jnp.float32), cos[:, None], sin[:, None]).astype(self.dtype)
                for i in (0, 1))
        o = get_attention(self.attention)(q[None], k[None], qkv[None, :, 2], mask_NN[None])
        return self.proj(o[0])


class VisionBlock(nnx.Module):
    def __init__(self, config: VisionConfig, *, attention: str, rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps, "vis_embed", **kw)
        self.attn = VisionAttention(config, attention=attention, rngs=rngs, **kw)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps, "vis_embed", **kw)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, "vis_embed", "vis_mlp", bias=True, rngs=rngs,
                          **kw)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, group 2x2 neighbours (contiguous rows) into one vector, Linear, exact GELU, Linear."""

    def __init__(self, config: VisionConfig, *, rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        wide = config.hidden_size * config.merge_unit
        self.unit = config.merge_unit
        self.ln_q = RMSNorm(config.hidden_size, config.rms_norm_eps, "vis_embed", **kw)
        self.mlp0 = dense(wide, wide, ("vis_merge", "vis_mlp"), bias=True, rngs=rngs, **kw)
        self.mlp2 = dense(wide, config.out_hidden_size, ("vis_mlp", "embed"), bias=True, rngs=rngs, **kw)

    def __call__(self, x_ND):
        n, d = x_ND.shape
        h = self.ln_q(x_ND).reshape(n // self.unit, self.unit * d)
        return self.mlp2(jax.nn.gelu(self.mlp0(h), approximate=False))


class VisionTower(nnx.Module):
    """Patches (any number of images, flattened) -> merged image embeddings (M, O) in image order."""

    def __init__(self, config: VisionConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention: str = "xla", remat: str = "none"):
        self.config = config
        self.dtype = dtype
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        # Conv3d with kernel == stride is a matmul over the flattened patch vector.
        self.patch_embed = param(rngs, (config.patch_dim, config.hidden_size), ("vis_patch", "vis_embed"),
                                 param_dtype)
        self.blocks = stacked(lambda r: VisionBlock(config, attention=attention, rngs=r, **kw), config.depth, rngs)
        self.merger = PatchMerger(config, rngs=rngs, **kw)

    def encode(self, inputs: VisionInputs):
        """Window-ordered pre-merger hidden states (N, Dv), as transformers' `last_hidden_state`."""
        cfg = self.config
        x = inputs.pixel_values[inputs.patch_order].astype(self.dtype) @ self.patch_embed[...].astype(self.dtype)
        cos, sin = vision_rotary(inputs.hw_N2, cfg.head_dim, cfg.rope_theta)
        window_mask, frame_mask = segment_mask(inputs.window_seg), segment_mask(inputs.frame_seg)
        is_full = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)

        def body(block, x, full):
            return block(x, cos, sin, jnp.where(full, frame_mask, window_mask)), None

        x, _ = scan_layers(self.blocks, body, x, jnp.asarray(is_full), carry_axes=ACT_ND, remat=self.remat)
        return x

    def __call__(self, inputs: VisionInputs):
        merged = self.merger(self.encode(inputs))
        # Real merged tokens first, in image order. One batch already ends in its padding; a global batch joins the
        # blocks of several processes, each ending in its own (`cpt_jax.sharding.global_batch`).
        unpermute = jnp.asarray(inputs.unpermute)  # host (numpy) inputs too: indexed by a traced order below
        is_pad = jnp.asarray(inputs.frame_seg)[unpermute * self.config.merge_unit] < 0
        return merged[unpermute[jnp.argsort(is_pad, stable=True)]]


def merged_count(grid_thw, config: VisionConfig) -> int:
    return num_patches(grid_thw) // config.merge_unit


