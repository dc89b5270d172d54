"""Qwen2.5-VL text decoder: Qwen2 layers (GQA with q/k/v bias, SwiGLU, RMSNorm) with multimodal rotary (M-RoPE).

Axis legend: B batch, L length, S cache length, D model dim, H heads, K kv heads, Dh head dim, F MLP dim, V vocab,
Ly layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cpt_jax.models.qwen2_5_vl.config import TextConfig
from cpt_jax.models.qwen2_5_vl.layers import (ACT_BLD, Linear, RMSNorm, SwiGLU, apply_rotary, constrain,
                                              get_attention, param, prefix_attention, scan_layers, stacked)


def mrope(position_ids_3BL, config: TextConfig, dtype):
    """cos/sin (B, L, Dh): frequency band i of `mrope_section` rotates with position axis i (t, h, w).

    Angles are computed in fp32 and cast to the activation dtype, as transformers does (so bf16 runs match it).
    """
    dh = config.head_dim
    inv = 1.0 / config.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
    f_3BLF = position_ids_3BL.astype(jnp.float32)[..., None] * inv
    bands, start = [], 0
    for axis, size in enumerate(config.mrope_section):
        bands.append(f_3BLF[axis, ..., start:start + size])
        start += size
    f = jnp.concatenate(bands, -1)
    emb = jnp.concatenate([f, f], -1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class Attention(nnx.Module):
    def __init__(self, config: TextConfig, *, attention: str, rngs, dtype, param_dtype):
        d, h, k, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attention = attention
        self.q_proj = Linear((d, h, dh), ("embed", "q_heads", "head_dim"), bias_shape=(h, dh),
                             bias_names=("q_heads", "head_dim"), spec="bld,dhk->blhk", **kw)
        self.k_proj = Linear((d, k, dh), ("embed", "kv_heads", "head_dim"), bias_shape=(k, dh),
                             bias_names=("kv_heads", "head_dim"), spec="bld,dhk->blhk", **kw)
        self.v_proj = Linear((d, k, dh), ("embed", "kv_heads", "head_dim"), bias_shape=(k, dh),
                             bias_names=("kv_heads", "head_dim"), spec="bld,dhk->blhk", **kw)
        self.o_proj = Linear((h, dh, d), ("q_heads", "head_dim", "embed"), spec="blhk,hkd->bld", **kw)

    def qkv(self, x_BLD, cos, sin):
        # Rotary in the activation dtype (no fp32 upcast), matching transformers' text attention.
        q = apply_rotary(self.q_proj(x_BLD), cos[:, :, None], sin[:, :, None])
        k = apply_rotary(self.k_proj(x_BLD), cos[:, :, None], sin[:, :, None])
        return q, k, self.v_proj(x_BLD)

    def __call__(self, x_BLD, cos, sin, mask_BLS):
        q, k, v = self.qkv(x_BLD, cos, sin)
        return self.o_proj(get_attention(self.attention)(q, k, v, mask_BLS)), (k, v)

    def extend(self, x_NTD, cos, sin, k_BSKD, v_BSKD, prefix_mask_BS, self_mask_NTT):
        """New tokens against a prefix's k/v (see `prefix_attention`); the prefix is neither copied nor repeated."""
        q, k, v = self.qkv(x_NTD, cos, sin)
        return self.o_proj(prefix_attention(q, k, v, k_BSKD, v_BSKD, prefix_mask_BS, self_mask_NTT)), (k, v)


class DecoderLayer(nnx.Module):
    def __init__(self, config: TextConfig, *, attention: str, rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", **kw)
        self.self_attn = Attention(config, attention=attention, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", **kw)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, "embed", "mlp", bias=False, rngs=rngs, **kw)

    def __call__(self, x, cos, sin, mask):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv

    def extend(self, x, cos, sin, k_prefix, v_prefix, prefix_mask, self_mask):
        a, kv = self.self_attn.extend(self.input_layernorm(x), cos, sin, k_prefix, v_prefix, prefix_mask, self_mask)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class TextDecoder(nnx.Module):
    """Token embedding, stacked decoder layers (scanned) and the final norm."""

    def __init__(self, config: TextConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention: str = "xla", remat: str = "none"):
        self.config = config
        self.dtype = dtype
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = stacked(lambda r: DecoderLayer(config, attention=attention, rngs=r, **kw),
                              config.num_hidden_layers, rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", **kw)

    def embed(self, input_ids_BL):
        # The lookup reads whole rows: gather the table's embedding axis first (FSDP), keep the vocabulary split.
        table_VD = constrain(self.embed_tokens[...], ("act_vocab", "act_embed"))
        return table_VD[input_ids_BL].astype(self.dtype)

    def __call__(self, x_BLD, position_ids_3BL, mask_BLS):
        """Full-sequence forward. Returns normed hidden states (B, L, D) and per-layer k, v (Ly, B, L, K, Dh)."""
        cos, sin = mrope(position_ids_3BL, self.config, self.dtype)

        def body(layer, x, _):
            return layer(x, cos, sin, mask_BLS)

        x, kv = scan_layers(self.layers, body, x_BLD, carry_axes=ACT_BLD, remat=self.remat)
        return self.norm(x), kv

    def extend(self, x_NTD, position_ids_3NT, k_prefix, v_prefix, prefix_mask_BS, self_mask_NTT, *,
               remat: str = "none"):
        """T new tokens per row after a prefix whose k/v (Ly, B, S, K, Dh) every group of N // B rows shares: one
        token against the cache in decoding (N = B, T = 1), a prompt's sampled responses in RFT (T = response
        length). `self_mask_NTT` says which new tokens each one sees. Returns hidden (N, T, D) and the new k, v."""
        cos, sin = mrope(position_ids_3NT, self.config, self.dtype)

        def body(layer, x, kv):
            return layer.extend(x, cos, sin, kv[0], kv[1], prefix_mask_BS, self_mask_NTT)

        x, kv = scan_layers(self.layers, body, x_NTD, (k_prefix, v_prefix), carry_axes=ACT_BLD, remat=remat)
        return self.norm(x), kv
