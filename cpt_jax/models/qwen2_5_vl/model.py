"""Qwen2.5-VL for conditional generation: vision tower + text decoder + lm_head, full-sequence and cached decoding.

Axis legend: B batch, L length, S cache length, D model dim, V vocab, M merged image tokens, Ly layers, K kv heads,
Dh head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from cpt_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from cpt_jax.models.qwen2_5_vl.layers import ACT_BLD, ACT_LBSKD, constrain, param
from cpt_jax.models.qwen2_5_vl.rope_index import get_rope_index
from cpt_jax.models.qwen2_5_vl.text import TextDecoder
from cpt_jax.models.qwen2_5_vl.vision import VisionInputs, VisionTower, merged_count, vision_inputs


@struct.dataclass
class KVCache:
    """Fixed-size decoding state; every field keeps its shape across steps (a `lax.while_loop` carry).

    Prompts are left-padded, so all rows write their next token to the same slot `index`.
    """

    k: jax.Array  # (Ly, B, S, K, Dh)
    v: jax.Array  # (Ly, B, S, K, Dh)
    mask: jax.Array  # (B, S) bool: slot holds a real token
    index: jax.Array  # () int32: next slot to write
    positions: jax.Array  # (3, B) int32: M-RoPE position of the next token per axis
    rope_deltas: jax.Array  # (B,) int32: next position - number of real tokens (transformers' rope_deltas)

    def repeat(self, n: int) -> "KVCache":
        """Each row repeated n times (rows b*n .. b*n+n-1), so n samples share one prefill."""
        return KVCache(k=jnp.repeat(self.k, n, axis=1), v=jnp.repeat(self.v, n, axis=1),
                       mask=jnp.repeat(self.mask, n, axis=0), index=self.index,
                       positions=jnp.repeat(self.positions, n, axis=1), rope_deltas=jnp.repeat(self.rope_deltas, n))


def causal_mask(attention_mask_BL):
    length = attention_mask_BL.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None] & attention_mask_BL.astype(bool)[:, None, :]


def _concrete(x, name: str) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"{name} is traced: under jit, pass precomputed `position_ids` (get_rope_index) and "
                         f"`vision` (vision_inputs) instead of deriving them from {name}")
    return np.asarray(x)


class Qwen2_5_VL(nnx.Module):
    """Qwen2.5-VL matching transformers' `Qwen2_5_VLForConditionalGeneration` numerically.

    `dtype` is the compute dtype, `param_dtype` the storage dtype; `attention` names an implementation in
    `layers.ATTENTION_IMPLS`; `remat` a policy in `layers.REMAT_POLICIES` applied per scanned layer.
    """

    def __init__(self, config: Qwen2_5_VLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention: str = "xla", remat: str = "none"):
        self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat)
        self.visual = VisionTower(config.vision, **kw)
        self.language_model = TextDecoder(config.text, **kw)
        t = config.text
        self.lm_head = (None if config.tie_word_embeddings
                        else param(rngs, (t.hidden_size, t.vocab_size), ("embed", "vocab"), param_dtype))

    # --- host-side preparation ----------------------------------------------------------------------------------

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                num_patches: int | None = None):
        """Host-side (numpy) position ids and vision inputs for concrete inputs, validated like transformers."""
        ids = _concrete(input_ids, "input_ids")
        mask = np.ones_like(ids) if attention_mask is None else _concrete(attention_mask, "attention_mask")
        n_tokens = int((ids == self.config.image_token_id).sum())
        if image_grid_thw is None:
            if n_tokens or pixel_values is not None:
                raise ValueError(f"input_ids hold {n_tokens} image tokens but image_grid_thw is None; pass "
                                 "pixel_values and image_grid_thw from the image processor")
            vision = None
        else:
            grid = _concrete(image_grid_thw, "image_grid_thw")
            expected = merged_count(grid, self.config.vision)
            if n_tokens != expected:
                raise ValueError(f"Image features and image tokens do not match: input_ids hold {n_tokens} image "
                                 f"tokens, image_grid_thw {grid.tolist()} gives {expected}")
            vision = vision_inputs(_concrete(pixel_values, "pixel_values"), grid, self.config.vision, num_patches)
        position_ids, rope_deltas = get_rope_index(ids, None if image_grid_thw is None else grid, mask, self.config)
        return position_ids, rope_deltas, vision

    # --- forward ------------------------------------------------------------------------------------------------

    def embed(self, input_ids_BL, vision: VisionInputs | None = None):
        """Token embeddings with the image embeddings scattered, in order, into the image-pad positions."""
        x = constrain(self.language_model.embed(input_ids_BL), ACT_BLD)
        if vision is None:
            return x
        image_MD = self.visual(vision).astype(x.dtype)
        is_image = input_ids_BL == self.config.image_token_id
        slot = jnp.cumsum(is_image.reshape(-1)) - 1  # row-major order, like torch's masked_scatter
        gathered = image_MD[jnp.clip(slot, 0, image_MD.shape[0] - 1)].reshape(x.shape)
        return constrain(jnp.where(is_image[..., None], gathered, x), ACT_BLD)

    def logits(self, hidden_D):
        """Logits (..., V) of hidden states (..., D) whose first axis is the batch (rows or tokens)."""
        if self.lm_head is None:
            w = self.language_model.embed_tokens[...].astype(self.dtype)
            logits = jnp.einsum("...d,vd->...v", hidden_D, w)
        else:
            logits = jnp.einsum("...d,dv->...v", hidden_D, self.lm_head[...].astype(self.dtype))
        return constrain(logits, ("act_batch",) + ("act_length",) * (logits.ndim - 2) + ("act_vocab",))

    def hidden_states(self, input_ids_BL, attention_mask_BL, position_ids_3BL, vision: VisionInputs | None = None):
        """Final normed hidden states (B, L, D) and per-layer keys/values (Ly, B, L, K, Dh)."""
        x = self.embed(input_ids_BL, vision)
        return self.language_model(x, position_ids_3BL, causal_mask(attention_mask_BL))

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                 position_ids=None, vision: VisionInputs | None = None):
        """Logits (B, L, V). Without `position_ids`/`vision`, they are derived host-side from concrete inputs."""
        if attention_mask is None:
            attention_mask = jnp.ones(jnp.shape(input_ids), jnp.int32)
        if position_ids is None or (vision is None and pixel_values is not None):
            position_ids, _, vision = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw)
        h, _ = self.hidden_states(input_ids, attention_mask, position_ids, vision)
        return self.logits(h)

    # --- cached decoding ----------------------------------------------------------------------------------------

    def prefill(self, input_ids_BL, attention_mask_BL, position_ids_3BL, vision: VisionInputs | None = None, *,
                cache_size: int):
        """Runs the left-padded prompt once; returns last-position logits (B, V) and a cache of `cache_size` slots."""
        batch, length = input_ids_BL.shape
        if cache_size < length:
            raise ValueError(f"cache_size={cache_size} is smaller than the prompt length {length}")
        h, (k, v) = self.hidden_states(input_ids_BL, attention_mask_BL, position_ids_3BL, vision)
        pad = ((0, 0), (0, 0), (0, cache_size - length), (0, 0), (0, 0))
        valid = attention_mask_BL.astype(bool)
        top = jnp.max(jnp.where(valid[None], position_ids_3BL, jnp.iinfo(jnp.int32).min), axis=(0, 2))
        cache = KVCache(
            k=constrain(jnp.pad(k, pad), ACT_LBSKD), v=constrain(jnp.pad(v, pad), ACT_LBSKD),
            mask=jnp.pad(valid, ((0, 0), (0, cache_size - length))),
            index=jnp.asarray(length, jnp.int32),
            positions=(position_ids_3BL[:, :, -1] + 1).astype(jnp.int32),
            rope_deltas=(top + 1 - valid.sum(-1)).astype(jnp.int32),
        )
        return self.logits(h[:, -1]), cache

    def decode_step(self, tokens_B, cache: KVCache):
        """Feeds one token per row; returns logits (B, V) and the advanced cache."""
        x = self.language_model.embed(tokens_B[:, None])
        h, (k_new, v_new) = self.language_model.extend(x, cache.positions[:, :, None], cache.k, cache.v, cache.mask,
                                                       jnp.ones((x.shape[0], 1, 1), bool))
        at = (0, 0, cache.index, 0, 0)
        cache = cache.replace(
            k=constrain(jax.lax.dynamic_update_slice(cache.k, k_new.astype(cache.k.dtype), at), ACT_LBSKD),
            v=constrain(jax.lax.dynamic_update_slice(cache.v, v_new.astype(cache.v.dtype), at), ACT_LBSKD),
            mask=jax.lax.dynamic_update_slice(cache.mask, jnp.ones((cache.mask.shape[0], 1), bool), (0, cache.index)),
            index=cache.index + 1,
            positions=cache.positions + 1,
        )
        return self.logits(h[:, 0]), cache
