"""The RFT update: exact micro-batch accumulation, and learning on an easy verifiable task."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cpt_jax.models.qwen2_5_vl import get_rope_index, vision_inputs
from cpt_jax.rl.sampling import generate
from cpt_jax.train.optimizer import Optimizer, OptimizerConfig, make_optimizer
from cpt_jax.models.qwen2_5_vl.model import causal_mask
from cpt_jax.train.rft import RFTConfig, RFTLearner, response_logprobs, response_positions
from cpt_jax.train.state import create_train_state
from tests.models.qwen2_5_vl.reference import IMAGE, TEXT_VOCAB, VEND, VSTART
from tests.train.test_sft import CONFIG, GRID, flat, split_model_of

G = 2


def prompt_batch(seed, n_prompts, length=12):
    """Left-padded prompts (ragged lengths), each with one image."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n_prompts, length), np.int32)
    mask = np.zeros_like(ids)
    for i in range(n_prompts):
        row = rng.integers(0, TEXT_VOCAB, 2).tolist() + [VSTART] + [IMAGE] * 4 + [VEND] + \
            rng.integers(0, TEXT_VOCAB, 1 + i % 3).tolist()
        ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
    grid = np.array([GRID] * n_prompts)
    pos, _ = get_rope_index(ids, grid, mask, CONFIG)
    pixels = rng.normal(size=(n_prompts * 16, CONFIG.vision.patch_dim)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": np.asarray(pos, np.int32),
            "vision": vision_inputs(pixels, grid, CONFIG.vision)}


def responses(seed, n_rows, length=6):
    rng = np.random.default_rng(seed)
    return rng.integers(0, TEXT_VOCAB, (n_rows, length)).astype(np.int32), rng.integers(1, length + 1, n_rows), \
        rng.random(n_rows).astype(np.float32)


def concat_prompts(a, b):
    pixels = np.concatenate([a["vision"].pixel_values, b["vision"].pixel_values])
    grid = np.array([GRID] * (a["input_ids"].shape[0] + b["input_ids"].shape[0]))
    out = {k: np.concatenate([a[k], b[k]], axis=1 if k == "position_ids" else 0)
           for k in ("input_ids", "attention_mask", "position_ids")}
    out["vision"] = vision_inputs(pixels, grid, CONFIG.vision)
    return out


def test_micro_batches_accumulate_to_one_large_batch():
    graphdef, params = split_model_of()
    # SGD with lr 1: the update is the accumulated gradient itself (Adam would amplify rounding of tiny entries).
    optimizer = Optimizer(tx=optax.sgd(1.0), learning_rate=optax.constant_schedule(1.0), frozen=nnx.Nothing())
    config = RFTConfig(num_samples=G, kl_coef=0.1, max_new_tokens=6)
    learner = RFTLearner(graphdef, config)
    ref = jax.tree.map(lambda x: x * 0.9, params)
    parts = []
    for seed, n in ((0, 2), (1, 3)):
        prompts = prompt_batch(seed, n)
        tokens, lengths, rewards = responses(seed + 10, n * G)
        parts.append((prompts, tokens, lengths, rewards))
    micro = [learner.prepare(params, ref, *p) for p in parts]
    # Old log-probs from the current policy: the first update's ratio is 1 and the KL term is live (ref != policy).
    whole = learner.prepare(params, ref, concat_prompts(parts[0][0], parts[1][0]),
                            np.concatenate([parts[0][1], parts[1][1]]), np.concatenate([parts[0][2], parts[1][2]]),
                            np.concatenate([parts[0][3], parts[1][3]]))
    state_a = create_train_state(nnx.merge(graphdef, jax.tree.map(jnp.copy, params)), optimizer, 0)[1]
    state_b = create_train_state(nnx.merge(graphdef, jax.tree.map(jnp.copy, params)), optimizer, 0)[1]
    state_a, metrics_a = learner.update(state_a, micro, optimizer)
    state_b, metrics_b = learner.update(state_b, [whole], optimizer)
    for key in ("loss", "grad_norm", "kl", "entropy"):
        np.testing.assert_allclose(float(metrics_a[key]), float(metrics_b[key]), rtol=1e-5, err_msg=key)
    assert float(metrics_a["kl"]) > 0
    a, b = flat(state_a.params), flat(state_b.params)
    for path in a:
        np.testing.assert_allclose(a[path], b[path], atol=1e-6, rtol=1e-5, err_msg=path)


def test_an_on_policy_micro_batch_skips_the_old_logprobs_and_updates_the_same():
    graphdef, params = split_model_of()
    optimizer = Optimizer(tx=optax.sgd(1.0), learning_rate=optax.constant_schedule(1.0), frozen=nnx.Nothing())
    learner = RFTLearner(graphdef, RFTConfig(num_samples=G, kl_coef=0.1, max_new_tokens=6))
    ref = jax.tree.map(lambda x: x * 0.9, params)
    prompts = prompt_batch(5, 3)
    tokens, lengths, rewards = responses(15, 3 * G)
    sampler = np.random.default_rng(0).normal(-1.0, 0.5, tokens.shape).astype(np.float32)
    recomputed = learner.prepare(params, ref, prompts, tokens, lengths, rewards, sampler_logprobs=sampler)
    on_policy = learner.prepare(params, ref, prompts, tokens, lengths, rewards, on_policy=True,
                                sampler_logprobs=sampler)
    assert "old_logprobs" not in on_policy and "old_logprobs" in recomputed
    updated = {}
    for name, batch in (("recomputed", recomputed), ("on_policy", on_policy)):
        state = create_train_state(nnx.merge(graphdef, jax.tree.map(jnp.copy, params)), optimizer, 0)[1]
        updated[name] = learner.update(state, [batch], optimizer)
    (state_a, metrics_a), (state_b, metrics_b) = updated["recomputed"], updated["on_policy"]
    # The loss is a near-cancelling sum of O(1) advantage-weighted ratios (0.004 here): compared to fp32 rounding of
    # those terms (atol), since a ratio exp(logp - old) of two programs differs from exactly 1 in the last bits.
    for key in ("loss", "grad_norm", "kl", "entropy"):
        np.testing.assert_allclose(float(metrics_b[key]), float(metrics_a[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    assert float(metrics_b["grad_norm"]) > 0
    a, b = flat(state_a.params), flat(state_b.params)
    for path in a:
        np.testing.assert_allclose(b[path], a[path], atol=1e-6, rtol=1e-5, err_msg=path)
    # Both report the gap of the sampler's log-probs to the recomputed old ones, over the response tokens.
    mask = np.asarray(recomputed["response_mask"], np.float32)
    expected = np.sum(np.abs(np.asarray(recomputed["old_logprobs"]) - sampler) * mask) / mask.sum()
    for metrics in (metrics_a, metrics_b):
        np.testing.assert_allclose(float(metrics["sampler_logprob_gap"]), expected, rtol=1e-5)


def test_each_prompt_runs_once_for_its_samples_with_the_result_of_full_rows():
    """Response log-probs with each prompt's keys/values shared by its samples equal those of running every
    [prompt, response] row through the model, and so do their gradients (O(1) weights, ragged prompts and lengths)."""
    graphdef, params = split_model_of(seed=2)
    # O(1) weights, N(0, 0.6); the norm scales (all near 1) stay.
    params = jax.tree.map(lambda x: x if jnp.all(x > 0.5) else 6.0 * x, params)
    prompts = prompt_batch(7, 3)
    tokens, lengths, _ = responses(17, 3 * G)
    mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int32)
    batch = dict(prompts, response=tokens, response_mask=mask)
    weights = np.random.default_rng(3).normal(size=tokens.shape).astype(np.float32) * mask

    def full_rows(params):
        model = nnx.merge(graphdef, params)
        lp, t = prompts["input_ids"].shape[1], tokens.shape[1]
        x = jnp.concatenate([jnp.repeat(model.embed(prompts["input_ids"], prompts["vision"]), G, axis=0),
                             model.language_model.embed(tokens)], axis=1)
        attention = np.concatenate([np.repeat(prompts["attention_mask"], G, axis=0), mask], axis=1)
        positions = jnp.concatenate([jnp.repeat(prompts["position_ids"], G, axis=1),
                                     response_positions(prompts["position_ids"], G, t)], axis=2)
        h, _ = model.language_model(x, positions, causal_mask(attention))
        logits = model.logits(h[:, lp - 1:-1])
        return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]

    def shared(params):
        return response_logprobs(graphdef, params, batch, 1.0)[0]

    def value_and_grad(logprobs):
        return jax.jit(jax.value_and_grad(lambda p: (jnp.sum(logprobs(p) * weights), logprobs(p)), has_aux=True))

    (_, expected), grad_expected = value_and_grad(full_rows)(params)
    (_, got), grad_got = value_and_grad(shared)(params)
    expected, got = np.asarray(expected) * mask, np.asarray(got) * mask
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    grad_expected, grad_got = flat(grad_expected), flat(grad_got)
    for path in grad_expected:
        scale = np.abs(grad_expected[path]).max()
        np.testing.assert_allclose(grad_got[path], grad_expected[path], atol=1e-5 * max(scale, 1.0), rtol=1e-4,
                                   err_msg=path)


def test_trainer_logprobs_match_the_sampler():
    graphdef, params = split_model_of()
    prompts = prompt_batch(3, 2)
    model = nnx.merge(graphdef, params)
    out = generate(model, prompts["input_ids"], prompts["attention_mask"], position_ids=prompts["position_ids"],
                   vision=prompts["vision"], max_new_tokens=5, temperature=1.0, num_samples=G,
                   rng=jax.random.key(0), length_buckets=(12,))
    mask = (np.arange(5)[None] < np.asarray(out.lengths)[:, None]).astype(np.int32)
    logp, _ = response_logprobs(graphdef, params, dict(prompts, response=out.tokens, response_mask=mask), 1.0)
    np.testing.assert_allclose(np.asarray(logp) * mask, np.asarray(out.logprobs) * mask, atol=2e-5)


def test_a_short_rft_run_raises_the_mean_reward():
    """Easy verifiable task: reward = fraction of response tokens below 64 (about 1/8 at the start)."""
    graphdef, params = split_model_of(seed=1)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2))
    config = RFTConfig(num_samples=8, use_kl=False, max_new_tokens=4, top_p=1.0)
    learner = RFTLearner(graphdef, config)
    _, state = create_train_state(nnx.merge(graphdef, params), optimizer, 0)
    prompts = prompt_batch(4, 4)
    means = []
    for it in range(12):
        model = nnx.merge(graphdef, state.params)
        out = generate(model, prompts["input_ids"], prompts["attention_mask"], position_ids=prompts["position_ids"],
                       vision=prompts["vision"], max_new_tokens=4, temperature=1.0, num_samples=8,
                       rng=jax.random.key(it), length_buckets=(12,))
        rewards = (np.asarray(out.tokens) < 64).mean(-1).astype(np.float32)
        means.append(float(rewards.mean()))
        batch = learner.prepare(state.params, None, prompts, out.tokens, out.lengths, rewards)
        state, metrics = learner.update(state, [batch], optimizer)
    assert np.mean(means[-3:]) > np.mean(means[:3]) + 0.2, means
