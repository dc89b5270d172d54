"""In-graph sampling: greedy parity with transformers' generate, sampler statistics, masks, stops, log-probs and
the number of compiled programs."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from cpt_jax.models.qwen2_5_vl import get_rope_index, load_hf_checkpoint, vision_inputs
from cpt_jax.rl.sampling import compile_count, generate, sampling_mask
from tests.models.qwen2_5_vl import reference as ref

PAD = 0
GRID = (1, 8, 12)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tiny")
    hf = ref.build_hf(ref.tiny_config(), seed=0)
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def model(hf_model):
    return load_hf_checkpoint(hf_model[1])


@pytest.fixture(scope="module")
def prompts():
    """Two left-padded prompts, the first with an image, the second text only."""
    rng = np.random.default_rng(0)
    ids, mask = ref.left_pad([ref.prompt(rng, [4, GRID, 6]), ref.prompt(rng, [9])], pad_id=PAD)
    return ids, mask, ref.pixels(rng, [GRID]), np.array([GRID])


@pytest.fixture(scope="module")
def greedy(model, prompts):
    ids, mask, pv, thw = prompts
    return generate(model, ids, mask, pv, thw, max_new_tokens=12, temperature=0.0)


def test_greedy_matches_transformers_generate(hf_model, prompts, greedy):
    ids, mask, pv, thw = prompts
    with torch.no_grad():
        out = hf_model[0].generate(
            input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), pixel_values=torch.as_tensor(pv),
            image_grid_thw=torch.as_tensor(thw), mm_token_type_ids=torch.as_tensor((ids == ref.IMAGE).astype(np.int64)),
            max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), out[:, ids.shape[1]:].numpy())
    np.testing.assert_array_equal(np.asarray(greedy.lengths), [12, 12])
    assert np.asarray(greedy.tokens).dtype == np.int32


def test_greedy_samples_repeat_the_single_greedy_row(model, prompts, greedy):
    ids, mask, pv, thw = prompts
    out = generate(model, ids, mask, pv, thw, max_new_tokens=12, temperature=0.0, num_samples=3)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.repeat(np.asarray(greedy.tokens), 3, axis=0))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.repeat(np.asarray(greedy.logprobs), 3, axis=0),
                               atol=1e-6, rtol=0)


def test_precomputed_positions_and_vision_give_the_same_rollout(model, prompts, greedy):
    ids, mask, pv, thw = prompts
    positions, _ = get_rope_index(ids, thw, mask, model.config)
    vision = vision_inputs(pv, thw, model.config.vision, pad_to=128)
    before = compile_count()
    out = generate(model, ids, mask, max_new_tokens=12, temperature=0.0, position_ids=positions, vision=vision)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(greedy.logprobs), atol=1e-6, rtol=0)
    assert compile_count() == before  # 128 patches is the bucket the raw inputs were padded to


def test_eos_stops_each_row_and_pads_after_it(model, prompts, greedy):
    ids, mask, pv, thw = prompts
    tokens = np.asarray(greedy.tokens)
    eos = (int(tokens[0, 3]), int(tokens[1, 6]))
    hits = np.isin(tokens, eos)
    stop = hits.argmax(1)
    assert hits.any(1).all() and stop.max() < tokens.shape[1] - 1, "both rows must stop early"
    out = generate(model, ids, mask, pv, thw, max_new_tokens=12, temperature=0.0, eos_token_ids=eos,
                   pad_token_id=-1)
    out_tokens, out_logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
    np.testing.assert_array_equal(np.asarray(out.lengths), stop + 1)
    for row, s in enumerate(stop):
        np.testing.assert_array_equal(out_tokens[row, :s + 1], tokens[row, :s + 1])
        np.testing.assert_allclose(out_logprobs[row, :s + 1], np.asarray(greedy.logprobs)[row, :s + 1], atol=1e-6)
        assert (out_tokens[row, s + 1:] == -1).all()
        assert (out_logprobs[row, s + 1:] == 0).all()


def test_logprobs_equal_teacher_forced_log_softmax(model, prompts):
    ids, mask, pv, thw = prompts
    n, steps, temperature = 3, 12, 0.8
    eos = tuple(range(0, ref.TEXT_VOCAB, 7))  # a seventh of the vocabulary, so rows stop at different steps
    out = generate(model, ids, mask, pv, thw, max_new_tokens=steps, temperature=temperature, top_k=64, top_p=0.95,
                   num_samples=n, eos_token_ids=eos, rng=jax.random.key(0))
    tokens, logprobs, lengths = (np.asarray(x) for x in (out.tokens, out.logprobs, out.lengths))
    assert len(set(lengths.tolist())) > 2 and lengths.max() == steps, lengths
    valid = np.arange(steps)[None] < lengths[:, None]
    # A sampled image placeholder would be read back as an image by the full forward; this seed samples none.
    assert (tokens[valid] < ref.TEXT_VOCAB).all()

    full_ids = np.concatenate([np.repeat(ids, n, 0), tokens], 1)
    full_mask = np.concatenate([np.repeat(mask, n, 0), valid.astype(mask.dtype)], 1)
    positions, _, vision = model.prepare(full_ids, full_mask, np.concatenate([pv] * n), np.repeat(thw, n, 0))
    forward = nnx.jit(lambda m, ids, mask, pos, vis: m(ids, attention_mask=mask, position_ids=pos, vision=vis))
    logits = np.asarray(forward(model, full_ids, full_mask, positions, vision))[:, ids.shape[1] - 1:-1]
    log_softmax = np.asarray(jax.nn.log_softmax(logits / temperature, axis=-1))
    expected = np.take_along_axis(log_softmax, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(logprobs[valid], expected[valid], atol=1e-5, rtol=0)
    assert (logprobs[~valid] == 0).all()
    assert (tokens[~valid] == PAD).all()
    last = tokens[np.arange(len(tokens)), lengths - 1]
    assert np.isin(last[lengths < steps], eos).all()
    assert not np.isin(tokens, eos)[np.arange(steps)[None] < lengths[:, None] - 1].any()


def _max_z(counts, probs):
    """Largest per-token deviation of multinomial counts in standard deviations (+3 counts of slack for tiny
    expectations, where the normal approximation fails). Each token exceeds 5 with probability < 1e-6, so all
    512 stay below it except with probability < 1e-3."""
    total = counts.sum()
    return np.max(np.abs(counts - total * probs) / (np.sqrt(total * probs * (1 - probs)) + 3 / 5))


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 40, 0.8), (0.9, 0, 0.9)])
def test_sampled_token_frequencies_match_the_tempered_softmax(hf_model, model, temperature, top_k, top_p):
    rows = 4096
    ids = np.array([ref.prompt(np.random.default_rng(1), [10])])
    out = generate(model, ids, max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                   num_samples=rows, rng=jax.random.key(0))
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=512)

    logits = ref.hf_forward(hf_model[0], ids)[0, -1]
    keep = np.asarray(sampling_mask(logits[None] / temperature, top_k=top_k, top_p=top_p))[0]
    probs = np.where(keep, np.exp((logits - logits.max()) / temperature), 0)
    assert counts[~keep].sum() == 0
    assert _max_z(counts, probs / probs.sum()) < 5
    # The bound is tight enough to notice sampling from the untempered, unfiltered softmax instead.
    untempered = np.exp(logits - logits.max())
    assert _max_z(counts, untempered / untempered.sum()) > 5


def test_top_k_keeps_exactly_k_tokens_even_with_ties():
    logits = np.array([[3.0, 1.0, 2.0, 2.0, 2.0, 0.5, -1.0],
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = np.asarray(sampling_mask(logits, top_k=3))
    np.testing.assert_array_equal(mask.sum(1), [3, 3])
    np.testing.assert_array_equal(mask[0], [1, 0, 1, 1, 0, 0, 0])  # ties go to the lower token id
    assert np.asarray(sampling_mask(logits, top_k=0)).all()


@pytest.mark.parametrize("top_k, top_p, kept", [
    (0, 1.0, 5),
    (0, 0.6, 2),  # 0.5 + 0.25
    (0, 0.8, 3),  # 0.5 + 0.25 + 0.125
    (0, 0.3, 1),  # the top token alone already reaches top_p
    (0, 1e-6, 1),
    (2, 1.0, 2),
    (2, 0.6, 1),  # top-p acts on the renormalised top-k mass: 2/3 >= 0.6
    (4, 0.9, 3),  # renormalised top-4: 0.53, 0.27, 0.13, 0.07
    (4, 0.95, 4),  # of the tied last two, the lower id
])
def test_top_p_keeps_the_smallest_set_reaching_p_after_top_k(top_k, top_p, kept):
    probs = np.array([0.0625, 0.25, 0.5, 0.0625, 0.125])
    mask = np.asarray(sampling_mask(np.log(probs)[None], top_k=top_k, top_p=top_p))[0]
    by_probability = [2, 1, 4, 0, 3]  # ties: lower id first
    np.testing.assert_array_equal(mask, np.isin(np.arange(5), by_probability[:kept]))


def test_top_p_keeps_ties_at_the_boundary_together():
    probs = np.array([0.4, 0.2, 0.2, 0.1, 0.1])
    for top_p, kept in ((0.5, [1, 1, 1, 0, 0]), (0.7, [1, 1, 1, 0, 0]), (0.85, [1, 1, 1, 1, 1])):
        mask = np.asarray(sampling_mask(np.log(probs)[None], top_p=top_p))[0]
        np.testing.assert_array_equal(mask, kept, err_msg=f"top_p={top_p}")


def test_top_p_equals_the_nucleus_of_a_sorted_vocabulary():
    """Against numpy: sort descending, keep a token while the mass before it is < p (no ties in random logits)."""
    rng = np.random.default_rng(7)
    logits = np.concatenate([rng.normal(0, s, (4, 8192)) for s in (0.5, 2.0, 6.0)]).astype(np.float32)
    for top_p in (0.1, 0.5, 0.9, 0.99, 0.999):
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        order = np.argsort(-probs, axis=1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, 1)
        before = np.cumsum(sorted_probs, 1) - sorted_probs
        expected = np.zeros_like(probs, bool)
        np.put_along_axis(expected, order, before < top_p, 1)
        mask = np.asarray(sampling_mask(logits, top_p=top_p))
        # fp32 softmax and summation order may move a token whose mass-before sits within rounding of p.
        close = np.zeros_like(probs, bool)
        np.put_along_axis(close, order, np.abs(before - top_p) < 1e-5, 1)
        np.testing.assert_array_equal(mask[~close], expected[~close], err_msg=f"top_p={top_p}")
        assert 1 < mask.sum(1).max() and mask.sum(1).min() >= 1


def test_compilations_stay_fixed_within_buckets(model, prompts):
    rng = np.random.default_rng(5)

    def run(segments, grid, temperature=0.0, top_k=0, seed=0):
        ids, mask = ref.left_pad([ref.prompt(rng, s) for s in segments])
        generate(model, ids, mask, ref.pixels(rng, [grid]), np.array([grid]), max_new_tokens=12,
                 temperature=temperature, top_k=top_k, rng=jax.random.key(seed))
        return compile_count()

    ids, mask, pv, thw = prompts  # 38 tokens and 96 patches: buckets 64 and 128, as the greedy fixture
    generate(model, ids, mask, pv, thw, max_new_tokens=12, temperature=0.0, rng=jax.random.key(0))
    start = compile_count()
    assert run([[10, (1, 8, 10), 20], [40]], (1, 8, 10)) == start  # 54 tokens, 80 patches
    assert run([[2, (1, 10, 12), 3], [60]], (1, 10, 12)) == start  # 62 tokens, 120 patches
    assert run([[2, (1, 12, 12), 2], [30]], (1, 12, 12)) == start + 1  # 144 patches: a new prefill only
    assert run([[12, (1, 8, 10), 2], [30]], (1, 8, 10), temperature=0.5, top_k=5) == start + 2  # a new decode only
    assert run([[9, (1, 10, 10), 3], [35]], (1, 10, 10), temperature=0.5, top_k=5, seed=9) == start + 2


def test_inputs_outside_the_supported_range_are_errors(model):
    ids = np.array([ref.prompt(np.random.default_rng(6), [40])])
    with pytest.raises(ValueError, match="prompt length 42 exceeds the largest of length_buckets"):
        generate(model, ids, max_new_tokens=2, temperature=0.0, length_buckets=(16, 32))
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(model, ids, np.pad(np.ones_like(ids), ((0, 0), (0, 1)))[:, 1:], max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="pass rng="):
        generate(model, ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p=0.0"):
        generate(model, ids, max_new_tokens=2, top_p=0.0, rng=jax.random.key(0))
