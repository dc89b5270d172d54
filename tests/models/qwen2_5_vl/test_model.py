"""Logit parity with transformers' Qwen2_5_VLForConditionalGeneration (fp32, eager) and cached decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, get_rope_index, load_hf_checkpoint, vision_inputs
from tests.models.qwen2_5_vl import reference as ref

TOL = 1e-4  # whole model, fp32


def _assert_logits_match(model, hf_model, ids, mask, grids, rng):
    pv = ref.pixels(rng, grids) if grids else None
    thw = np.array(grids) if grids else None
    ours = np.asarray(model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw))
    theirs = ref.hf_forward(hf_model, ids, mask, pv, thw)
    valid = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    assert np.abs(theirs[valid]).max() > 1.0, "logits are O(1): weights were redrawn"
    diff = np.abs(ours[valid] - theirs[valid]).max()
    assert diff <= TOL, diff
    return diff


def test_text_only(model, hf_model):
    rng = np.random.default_rng(1)
    ids = np.array([ref.prompt(rng, [30])])
    _assert_logits_match(model, hf_model, ids, None, [], rng)


def test_one_image(model, hf_model):
    rng = np.random.default_rng(2)
    grids = [(1, 8, 12)]
    ids = np.array([ref.prompt(rng, [5, grids[0], 7])])
    _assert_logits_match(model, hf_model, ids, None, grids, rng)


def test_two_images_uneven_windows(model, hf_model):
    # 12x20 patches: uneven windows at the right/bottom edges; 8x8: an exactly divisible side adds an empty window.
    rng = np.random.default_rng(3)
    grids = [(1, 12, 20), (1, 8, 8)]
    ids = np.array([ref.prompt(rng, [9, grids[0], 2, grids[1], 12])])
    _assert_logits_match(model, hf_model, ids, None, grids, rng)


def test_left_padded_batch_with_different_image_counts(model, hf_model):
    rng = np.random.default_rng(4)
    rows = [ref.prompt(rng, [4, (1, 4, 4), 3, (1, 8, 4), 5]), ref.prompt(rng, [2, (1, 4, 8), 20]),
            ref.prompt(rng, [11])]
    ids, mask = ref.left_pad(rows)
    _assert_logits_match(model, hf_model, ids, mask, [(1, 4, 4), (1, 8, 4), (1, 4, 8)], rng)


def test_tied_embeddings(tmp_path):
    config = ref.tiny_config(tied=True)
    hf = ref.build_hf(config, seed=5)
    hf.save_pretrained(tmp_path)
    model = load_hf_checkpoint(tmp_path)
    assert model.lm_head is None
    rng = np.random.default_rng(5)
    ids = np.array([ref.prompt(rng, [3, (1, 4, 4), 6])])
    _assert_logits_match(model, hf, ids, None, [(1, 4, 4)], rng)


def test_image_token_count_mismatch_is_an_error(model):
    rng = np.random.default_rng(6)
    ids = np.array([ref.prompt(rng, [3, (1, 4, 4), 3])])
    with pytest.raises(ValueError, match="image tokens do not match"):
        model(ids, pixel_values=ref.pixels(rng, [(1, 8, 4)]), image_grid_thw=np.array([[1, 8, 4]]))


def test_jitted_forward_with_precomputed_inputs_equals_eager(model):
    rng = np.random.default_rng(7)
    grids = [(1, 8, 8)]
    ids, mask = ref.left_pad([ref.prompt(rng, [3, grids[0], 4]), ref.prompt(rng, [9])])
    pv = ref.pixels(rng, grids)
    eager = model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=np.array(grids))
    pos, _ = get_rope_index(ids, np.array(grids), mask, model.config)
    vis = vision_inputs(pv, np.array(grids), model.config.vision, pad_to=96)  # padded patch bucket

    @nnx.jit
    def forward(m, ids, mask, pos, vis):
        return m(ids, attention_mask=mask, position_ids=pos, vision=vis)

    jitted = forward(model, ids, mask, pos, vis)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(jitted)[valid], np.asarray(eager)[valid], atol=1e-5, rtol=0)


def _greedy(model, ids, mask, grids, pv, steps, cache_size):
    pos, _ = get_rope_index(ids, np.array(grids) if grids else None, mask, model.config)
    vis = vision_inputs(pv, np.array(grids), model.config.vision) if grids else None
    prefill = nnx.jit(lambda m, *a: m.prefill(*a, cache_size=cache_size))
    decode = nnx.jit(lambda m, tok, cache: m.decode_step(tok, cache))
    logits, cache = prefill(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos), vis)
    tokens, step_logits = [], [logits]
    for _ in range(steps):
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        tokens.append(tok)
        logits, cache = decode(model, tok, cache)
        step_logits.append(logits)
    return np.stack(tokens, 1), np.stack(step_logits, 1), cache


def test_cached_decoding_equals_full_recomputation(model):
    rng = np.random.default_rng(8)
    grids = [(1, 4, 8)]
    ids, mask = ref.left_pad([ref.prompt(rng, [3, grids[0], 5]), ref.prompt(rng, [6])])
    pv = ref.pixels(rng, grids)
    steps = 6
    tokens, step_logits, cache = _greedy(model, ids, mask, grids, pv, steps, cache_size=ids.shape[1] + steps + 3)
    full_ids = np.concatenate([ids, tokens], 1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], 1)
    full = np.asarray(model(full_ids, attention_mask=full_mask, pixel_values=pv, image_grid_thw=np.array(grids)))
    length = ids.shape[1]
    np.testing.assert_allclose(step_logits, full[:, length - 1:], atol=1e-5, rtol=0)
    _, deltas = get_rope_index(ids, np.array(grids), mask, model.config)
    np.testing.assert_array_equal(np.asarray(cache.rope_deltas), deltas)


def test_greedy_matches_transformers_generate(model, hf_model):
    import torch

    rng = np.random.default_rng(9)
    grids = [(1, 8, 12)]
    ids = np.array([ref.prompt(rng, [4, grids[0], 6])])
    mask = np.ones_like(ids)
    pv = ref.pixels(rng, grids)
    steps = 16
    tokens, _, _ = _greedy(model, ids, mask, grids, pv, steps, cache_size=ids.shape[1] + steps)
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
            pixel_values=torch.as_tensor(pv), image_grid_thw=torch.as_tensor(np.array(grids)),
            mm_token_type_ids=torch.as_tensor((ids == ref.IMAGE).astype(np.int64)),
            max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(tokens[0], out[0, ids.shape[1]:].numpy())


def test_bf16_compute_stays_close_to_fp32(hf_dir):
    """bf16 has an 8-bit significand (relative rounding 2^-9 ≈ 2e-3 per op). Through 2 vision blocks, the merger
    and 2 decoder layers, errors compound to a few percent of the logit scale; we bound the max deviation by 5% of
    the largest fp32 logit and require the greedy token to agree on nearly every position."""
    rng = np.random.default_rng(10)
    grids = [(1, 8, 8)]
    ids = np.array([ref.prompt(rng, [6, grids[0], 20])])
    pv = ref.pixels(rng, grids)
    fp32 = np.asarray(load_hf_checkpoint(hf_dir)(ids, pixel_values=pv, image_grid_thw=np.array(grids)))
    bf16_model = load_hf_checkpoint(hf_dir, dtype=jnp.bfloat16)
    out = bf16_model(ids, pixel_values=pv, image_grid_thw=np.array(grids))
    assert out.dtype == jnp.bfloat16
    bf16 = np.asarray(out, np.float32)
    assert np.isfinite(bf16).all()
    scale = np.abs(fp32).max()
    assert np.abs(bf16 - fp32).max() <= 0.05 * scale, (np.abs(bf16 - fp32).max(), scale)
    assert (bf16.argmax(-1) == fp32.argmax(-1)).mean() >= 0.9


def test_parameter_gradients_match_transformers(model, hf_model):
    """The gradient of sum(logits * R) for every parameter (text and vision, two images, left padding) equals
    torch's autograd through transformers, so the training steps differentiate the same function."""
    import torch

    from cpt_jax.models.qwen2_5_vl.hf_io import iter_hf_tensors

    rng = np.random.default_rng(11)
    grids = [(1, 4, 4), (1, 4, 8)]
    ids, mask = ref.left_pad([ref.prompt(rng, [3, grids[0], 4]), ref.prompt(rng, [2, grids[1], 2])])
    pv, thw = ref.pixels(rng, grids), np.array(grids)
    weights = rng.standard_normal(ids.shape + (model.config.text.vocab_size,)).astype(np.float32) * mask[..., None]
    position_ids, _, vision = model.prepare(ids, mask, pv, thw)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def objective(params):
        logits = nnx.merge(graphdef, params, rest)(ids, mask, position_ids=position_ids, vision=vision)
        return jnp.sum(logits * weights)

    ours = dict(iter_hf_tensors(nnx.merge(graphdef, jax.jit(jax.grad(objective))(params), rest)))
    hf_model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        kwargs = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                      mm_token_type_ids=torch.as_tensor((ids == ref.IMAGE).astype(np.int64)),
                      pixel_values=torch.as_tensor(pv), image_grid_thw=torch.as_tensor(thw))
        (hf_model(**kwargs).logits * torch.as_tensor(weights)).sum().backward()
    theirs = {name.replace("model.language_model.", "model.").replace("model.visual.", "visual."): p.grad.numpy()
              for name, p in hf_model.named_parameters()}
    hf_model.zero_grad(set_to_none=True)
    assert set(ours) == set(theirs)
    for name, grad in theirs.items():
        scale = np.abs(grad).max()
        assert scale > 0, name
        np.testing.assert_allclose(np.asarray(ours[name]), grad, rtol=TOL, atol=TOL * scale, err_msg=name)


def test_a_dots_remat_policy_keeps_the_linear_layers_dots():
    """Outside remat, `Linear` differentiates through its own VJP (the weight gradient's transpose on the smaller
    operand); inside a remat policy it is a plain einsum, so `checkpoint_dots` saves its dots instead of rerunning
    them, and both give the same gradient."""
    from cpt_jax.models.qwen2_5_vl.layers import dense, maybe_remat

    rngs = nnx.Rngs(0)
    up, down = (dense(a, b, ("embed", "mlp"), bias=True, rngs=rngs, dtype=jnp.float32, param_dtype=jnp.float32)
                for a, b in ((8, 32), (32, 8)))
    graphdef, params = nnx.split((up, down))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 8)), jnp.float32)

    def f(params, x):
        a, b = nnx.merge(graphdef, params)
        return jnp.sum(jnp.tanh(b(jnp.tanh(a(x)))))

    grads, dots = {}, {}
    for policy in ("none", "dots"):
        fn = jax.grad(maybe_remat(f, policy))
        dots[policy] = str(jax.make_jaxpr(fn)(params, x)).count("dot_general")
        grads[policy] = jax.tree.leaves(fn(params, x))
    # Forward 2, then 2 weight gradients and the second layer's input gradient; the custom VJP also writes the first
    # layer's (unused, dropped under jit). A remat policy that could not see the dots would rerun 2 more.
    assert dots == {"none": 6, "dots": 5}, dots
    for a, b in zip(grads["none"], grads["dots"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
