"""In-graph rollouts: one jitted prefill per prompt batch, then one jitted `lax.while_loop` decode.

The image is encoded and the prompt prefilled once per prompt; the resulting KV cache is repeated for the samples
of that prompt, so rows b*n .. b*n+n-1 of every output are the n samples of prompt b. Decoding runs over a
fixed-size cache and stops early once every row has emitted an end-of-sequence token; there is no host sync per
token. Prompt lengths and image patch counts are padded up to buckets so a run compiles a bounded number of
programs (count them with `compile_count`).

Axis legend: B prompts, R = B * num_samples rows, L prompt length (bucketed), T new tokens, V vocab, C candidates.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from cpt_jax import sharding
from cpt_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from cpt_jax.models.qwen2_5_vl.model import KVCache, Qwen2_5_VL
from cpt_jax.models.qwen2_5_vl.rope_index import get_rope_index
from cpt_jax.models.qwen2_5_vl.vision import VisionInputs, num_patches

DEFAULT_LENGTH_BUCKETS = tuple(2**i for i in range(4, 16))  # 16 .. 32768 tokens
DEFAULT_PATCH_BUCKETS = tuple(2**i for i in range(6, 18))  # 64 .. 131072 patches

_traces = collections.Counter()


@struct.dataclass
class SampleOutput:
    """Sampled continuations; rows b*n .. b*n+n-1 are the n samples of prompt b.

    tokens (R, T) int32, `pad_token_id` after a row's end-of-sequence token; logprobs (R, T) float32, the sampler's
    log-probability of each chosen token, 0 after the row stopped; lengths (R,) int32, tokens per row including the
    end-of-sequence token.
    """

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array


@dataclasses.dataclass(frozen=True)
class _DecodeConfig:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


def compile_count() -> int:
    """How many times the prefill and decode programs have been traced (each trace is one compilation)."""
    return sum(_traces.values())


def sampling_mask(logits_RV, *, top_k: int = 0, top_p: float = 1.0):
    """Tokens (R, V) bool that sampling may pick from `logits_RV` (already divided by the temperature).

    Top-k keeps exactly the k largest logits (ties broken by lower token id); top-p then keeps, of the renormalised
    remainder, the smallest most-likely set whose probability reaches `top_p`, and with it every token as probable
    as the least probable one kept (ties at the boundary stay together). The top token is always kept.
    """
    logits_RC, ids_RC = _candidates(logits_RV, top_k, top_p)
    rows = jnp.arange(logits_RV.shape[0])[:, None]
    return jnp.zeros(logits_RV.shape, bool).at[rows, ids_RC].set(logits_RC > -jnp.inf)


def _candidates(logits_RV, top_k: int, top_p: float):
    """Candidate logits (R, C), -inf where masked, and their token ids: the whole vocabulary, or the top k sorted."""
    if top_k == 0:
        ids_RV = jax.lax.broadcasted_iota(jnp.int32, logits_RV.shape, 1)
        return (logits_RV if top_p >= 1.0 else _nucleus(logits_RV, top_p)), ids_RV
    logits_RC, ids_RC = jax.lax.top_k(logits_RV, top_k)
    if top_p < 1.0:
        logits_RC = _nucleus(logits_RC, top_p)
    return logits_RC, ids_RC.astype(jnp.int32)


def _nucleus(logits_RC, top_p: float):
    """`logits_RC` with -inf outside the top-p nucleus: a token stays iff the tokens more probable than it hold less
    than `top_p` of the probability.

    That is every token at or above one probability threshold, found by bisection instead of sorting the vocabulary
    (on CPU the sort was a third of a decode step at vocab 8192): positive float32s order like their int32 bit
    patterns, so 31 halvings of the bit range leave `lo` and `hi` adjacent floats with mass_above(lo) >= top_p >
    mass_above(hi); the threshold is then `hi`, a probability of the row.
    """
    probs_RC = jax.nn.softmax(logits_RC, axis=-1)

    def mass_above(bits_R):
        threshold_R1 = jax.lax.bitcast_convert_type(bits_R, jnp.float32)[:, None]
        return jnp.sum(jnp.where(probs_RC > threshold_R1, probs_RC, 0.0), axis=-1)

    def halve(_, bounds):
        lo_R, hi_R = bounds
        mid_R = lo_R + (hi_R - lo_R) // 2
        enough_R = mass_above(mid_R) >= top_p
        return jnp.where(enough_R, mid_R, lo_R), jnp.where(enough_R, hi_R, mid_R)

    hi_R = jax.lax.bitcast_convert_type(jnp.max(probs_RC, axis=-1), jnp.int32)  # nothing is above the top token
    lo_R, _ = jax.lax.fori_loop(0, 31, halve, (jnp.zeros_like(hi_R), hi_R))
    keep_RC = probs_RC > jax.lax.bitcast_convert_type(lo_R, jnp.float32)[:, None]
    return jnp.where(keep_RC, logits_RC, -jnp.inf)


def _choose(logits_RV, key, cfg: _DecodeConfig):
    """Next token per row and its log-probability under log_softmax(logits / temperature) (unmasked)."""
    logits_RV = logits_RV.astype(jnp.float32)
    if cfg.temperature == 0.0:
        tokens_R = jnp.argmax(logits_RV, axis=-1).astype(jnp.int32)
    else:
        logits_RV = logits_RV / cfg.temperature
        logits_RC, ids_RC = _candidates(logits_RV, cfg.top_k, cfg.top_p)
        pick_R = jax.random.categorical(key, logits_RC, axis=-1)
        tokens_R = jnp.take_along_axis(ids_RC, pick_R[:, None], axis=-1)[:, 0]
    logprobs_R = jnp.take_along_axis(jax.nn.log_softmax(logits_RV, axis=-1), tokens_R[:, None], axis=-1)[:, 0]
    return tokens_R, logprobs_R


def _prefill(graphdef, state, prompts, *, cache_size: int, num_samples: int):
    """`prompts`: input_ids and attention_mask (B, L), position_ids (3, B, L), vision (or None)."""
    _traces["prefill"] += 1
    model = nnx.merge(graphdef, state)
    logits_BV, cache = model.prefill(prompts["input_ids"], prompts["attention_mask"], prompts["position_ids"],
                                     prompts["vision"], cache_size=cache_size)
    return jnp.repeat(logits_BV, num_samples, axis=0), cache.repeat(num_samples)


def _decode(graphdef, state, logits_RV, cache: KVCache, rng, *, cfg: _DecodeConfig):
    _traces["decode"] += 1
    model = nnx.merge(graphdef, state)
    rows, steps = logits_RV.shape[0], cfg.max_new_tokens
    eos_E = jnp.asarray(cfg.eos_token_ids, jnp.int32).reshape(-1)

    def record(step, logits_RV, tokens_RT, logprobs_RT, lengths_R, done_R):
        """Chooses the tokens of `step`; finished rows record padding but are fed the (in-vocabulary) choice."""
        tok_R, lp_R = _choose(logits_RV, jax.random.fold_in(rng, step), cfg)
        kept_R = jnp.where(done_R, cfg.pad_token_id, tok_R)
        lp_R = jnp.where(done_R, 0.0, lp_R)
        tokens_RT = jax.lax.dynamic_update_slice(tokens_RT, kept_R[:, None], (0, step))
        logprobs_RT = jax.lax.dynamic_update_slice(logprobs_RT, lp_R[:, None], (0, step))
        lengths_R = lengths_R + (~done_R).astype(jnp.int32)
        done_R = done_R | (tok_R[:, None] == eos_E).any(-1)
        return tok_R, tokens_RT, logprobs_RT, lengths_R, done_R

    outputs_0 = (jnp.full((rows, steps), cfg.pad_token_id, jnp.int32), jnp.zeros((rows, steps), jnp.float32),
               jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), bool))

    def cond(carry):
        step, _, _, _, _, _, done_R = carry
        return (step < steps) & ~done_R.all()

    def body(carry):
        step, cache, tok_R, *outputs = carry
        logits_RV, cache = model.decode_step(tok_R, cache)
        return step + 1, cache, *record(step, logits_RV, *outputs)

    carry = (jnp.asarray(1, jnp.int32), cache, *record(0, logits_RV, *outputs_0))
    _, cache, _, tokens_RT, logprobs_RT, lengths_R, _ = jax.lax.while_loop(cond, body, carry)
    # Returning the cache aliases it to the donated input, so the loop updates it in place instead of a copy.
    return SampleOutput(tokens=tokens_RT, logprobs=logprobs_RT, lengths=lengths_R), cache


@functools.cache
def programs(layout: sharding.Layout | None):
    """The jitted prefill `(graphdef, params, prompts, *, cache_size, num_samples) -> (logits, cache)` and decode
    `(graphdef, params, logits, cache, rng, *, cfg) -> (samples, cache)` (`decode_config`), with the signatures
    `sharding.PROGRAMS` declares; one pair per layout."""
    return (sharding.jit(_prefill, "rollout_prefill", layout, static_argnames=("cache_size", "num_samples")),
            sharding.jit(_decode, "rollout_decode", layout, static_argnames=("cfg",)))


def generate(model: Qwen2_5_VL, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             num_samples: int = 1, eos_token_ids=(), rng: jax.Array | None = None, position_ids=None,
             vision: VisionInputs | None = None, pad_token_id: int = 0,
             length_buckets=DEFAULT_LENGTH_BUCKETS, patch_buckets=DEFAULT_PATCH_BUCKETS,
             layout: sharding.Layout | None = None) -> SampleOutput:
    """Samples `num_samples` continuations of `max_new_tokens` tokens for each left-padded prompt.

    Inputs are concrete host arrays as the processor gives them (`input_ids`/`attention_mask` (B, L), the HF
    `pixel_values` rows and `image_grid_thw`), or with `position_ids` (3, B, L) and `vision` precomputed (then
    `vision` is used with its own patch count). Prompts are padded on the left to the next of `length_buckets` and
    image patches to the next of `patch_buckets`, so equal buckets reuse compiled programs.

    `temperature=0` is greedy decoding. Otherwise tokens are drawn from softmax(logits / temperature) restricted by
    `top_k` (0 = off) and then `top_p` (1 = off); `logprobs` are always of the unrestricted log_softmax(logits /
    temperature) (log_softmax(logits) when greedy), as the policy scores them in training. A row stops after any of
    `eos_token_ids`; later positions hold `pad_token_id`.

    With `layout`, prefill and decode run in its sampler layout (`model` should already be there: see
    `sharding.reshard`) with the prompts split over its data-parallel axes. On several processes each passes its
    own prompts, padded to the same buckets, and gets global outputs (`sharding.local_batch` gives its rows back).
    """
    cfg = decode_config(model.config, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        top_k=top_k, num_samples=num_samples, eos_token_ids=eos_token_ids,
                        pad_token_id=pad_token_id)
    if rng is None:
        if temperature > 0:
            raise ValueError(f"temperature={temperature} samples at random; pass rng=jax.random.key(seed) "
                             "(or temperature=0 for greedy decoding)")
        rng = jax.random.key(0)
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    right_padded = np.flatnonzero(mask[:, -1] == 0)
    if right_padded.size:
        raise ValueError(f"prompt rows {right_padded.tolist()} end with padding (attention_mask 0 in the last "
                         "column); generate continues every row at its last position, so pad prompts on the left")

    length = _bucket(ids.shape[1], length_buckets, "prompt length", "length_buckets")
    extra = length - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_token_id).astype(np.int32)
    mask = np.pad(mask, ((0, 0), (extra, 0))).astype(np.int32)
    if position_ids is not None:
        position_ids = np.pad(np.asarray(position_ids), ((0, 0), (0, 0), (extra, 0)))
    if vision is None and (position_ids is None or pixel_values is not None):
        patches = (None if image_grid_thw is None
                   else _bucket(num_patches(image_grid_thw), patch_buckets, "image patch count", "patch_buckets"))
        computed, _, vision = model.prepare(ids, mask, pixel_values, image_grid_thw, num_patches=patches)
        position_ids = computed if position_ids is None else position_ids
    elif position_ids is None:
        position_ids, _ = get_rope_index(ids, image_grid_thw, mask, model.config)

    prompts = {"input_ids": ids, "attention_mask": mask, "position_ids": np.asarray(position_ids, np.int32),
               "vision": vision}
    if layout is not None:
        prompts = sharding.global_batch(prompts, layout, sampler=True)
    prefill, decode = programs(layout)
    graphdef, state = nnx.split(model)
    logits_RV, cache = prefill(graphdef, state, prompts, cache_size=length + max_new_tokens - 1,
                               num_samples=num_samples)
    out, _ = decode(graphdef, state, logits_RV, cache, rng, cfg=cfg)
    return out


def decode_config(config: Qwen2_5_VLConfig, *, max_new_tokens, temperature, top_p, top_k, num_samples,
                  eos_token_ids, pad_token_id) -> _DecodeConfig:
    """The static settings of the decode program for a model of `config`, after checking every sampling argument
    (`num_samples` included)."""
    vocab = config.text.vocab_size
    checks = [
        (max_new_tokens >= 1, f"max_new_tokens={max_new_tokens} must be at least 1"),
        (temperature >= 0, f"temperature={temperature} must be >= 0 (0 is greedy decoding)"),
        (0 < top_p <= 1, f"top_p={top_p} must be in (0, 1] (1 turns nucleus sampling off)"),
        (0 <= top_k <= vocab, f"top_k={top_k} must be in [0, {vocab}] (0 turns top-k off)"),
        (num_samples >= 1, f"num_samples={num_samples} must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    eos = tuple(int(t) for t in np.atleast_1d(np.asarray(eos_token_ids, np.int64)))
    return _DecodeConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
                         top_p=float(top_p), eos_token_ids=eos, pad_token_id=int(pad_token_id))


def _bucket(size: int, buckets, what: str, argument: str) -> int:
    buckets = sorted(buckets)
    at = bisect.bisect_left(buckets, size)
    if at == len(buckets):
        raise ValueError(f"{what} {size} exceeds the largest of {argument} ({buckets[-1] if buckets else 'none'}); "
                         f"add a larger bucket to {argument} or shorten the input")
    return buckets[at]
