import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, get_rope_index, vision_inputs
from cpt_jax.train.optimizer import Optimizer, make_optimizer, path_str
from cpt_jax.train.sft import make_sft_step, sft_loss, stack_micro_batches
from cpt_jax.train.state import check_finite, create_train_state
from tests.models.qwen2_5_vl.reference import IMAGE, TEXT_VOCAB, VEND, VSTART, tiny_config

CONFIG = tiny_config()
GRID = (1, 4, 4)  # one frame of 4x4 patches = 4 merged image tokens
LENGTH = 20


def example(rng, n_prompt, n_answer, image):
    """Token ids and loss mask of one row: text, an image, text, then the answer (the only loss tokens)."""
    image = [VSTART] + [IMAGE] * (np.prod(GRID) // 4) + [VEND] if image else []
    prompt = rng.integers(0, TEXT_VOCAB, n_prompt).tolist() + image + rng.integers(0, TEXT_VOCAB, 2).tolist()
    answer = rng.integers(0, TEXT_VOCAB, n_answer).tolist()
    return prompt + answer, [0] * len(prompt) + [1] * n_answer


def make_batch(rows, seed, images=True):
    """Right-padded batch, one image per row if `images`; `rows` = [(n_prompt, n_answer), ...] (ragged)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(rows), LENGTH), np.int32)
    attention, loss_mask = np.zeros_like(ids), np.zeros_like(ids)
    for i, (n_prompt, n_answer) in enumerate(rows):
        tokens, mask = example(rng, n_prompt, n_answer, images)
        ids[i, :len(tokens)], loss_mask[i, :len(tokens)], attention[i, :len(tokens)] = tokens, mask, 1
    grid = np.array([GRID] * len(rows)) if images else None
    position_ids, _ = get_rope_index(ids, grid, attention, CONFIG)
    batch = {"input_ids": ids, "attention_mask": attention, "position_ids": np.asarray(position_ids, np.int32),
             "loss_mask": loss_mask}
    if images:
        pixels = rng.normal(size=(len(rows) * int(np.prod(GRID)), CONFIG.vision.patch_dim)).astype(np.float32)
        batch["vision"] = vision_inputs(pixels, grid, CONFIG.vision)
    return batch


def flat(params):
    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def split_model_of(dtype=jnp.float32, seed=0):
    """(graphdef, params) of the tiny model, drawn with numpy: random init in JAX compiles one program per shape."""
    abstract = nnx.eval_shape(lambda: Qwen2_5_VL(CONFIG, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, shapes = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(seed)

    def draw(key_path, x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if path_str(key_path).endswith("scale/value") else 0.1 * noise)

    return graphdef, jax.tree_util.tree_map_with_path(draw, shapes)


def fresh(params):
    """A copy of the parameters: a donating step consumes the arrays of the state it is given."""
    return jax.tree.map(jnp.copy, params)


@pytest.fixture(scope="module")
def split_model():
    return split_model_of()


def test_loss_matches_reference_cross_entropy(split_model):
    graphdef, params = split_model
    batch = make_batch([(3, 4), (1, 6), (5, 2)], seed=0)
    # Padding never counts, even where a pipeline marked it.
    batch["loss_mask"][2, -1] = 1

    @jax.jit
    def run(params, batch):
        logits = nnx.merge(graphdef, params)(batch["input_ids"], batch["attention_mask"],
                                             position_ids=batch["position_ids"], vision=batch["vision"])
        return logits, sft_loss(graphdef, params, batch), sft_loss(graphdef, params, batch, logits_chunk=7)

    logits, (loss_sum, count), (chunked_sum, chunked_count) = run(params, batch)
    shifted = np.asarray(logits, np.float64) - np.asarray(logits, np.float64).max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected, n = 0.0, 0
    for b, (n_prompt, n_answer) in enumerate([(3, 4), (1, 6), (5, 2)]):
        start = n_prompt + 6 + 2  # prompt text, 6 image tokens, 2 more text tokens
        for t in range(start, start + n_answer):  # token t is predicted at position t - 1
            expected -= logp[b, t - 1, batch["input_ids"][b, t]]
            n += 1
    assert float(count) == n == 12
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-6)
    assert float(chunked_count) == n
    np.testing.assert_allclose(float(chunked_sum), float(loss_sum), rtol=1e-6)


def test_step_rejects_a_batch_of_the_wrong_rank(split_model):
    graphdef, params = split_model
    optimizer = make_optimizer({})
    _, state = create_train_state(nnx.merge(graphdef, fresh(params)), optimizer, 0)
    batch = make_batch([(3, 4)], seed=0, images=False)
    batch = {k: v[None] for k, v in stack_micro_batches([batch]).items()}
    with pytest.raises(ValueError, match=r"input_ids has shape \(1, 1, 1, 20\); expected \(B, L\)"):
        make_sft_step(graphdef, optimizer)(state, batch)
    with pytest.raises(KeyError, match=r"SFT batch lacks \['loss_mask'\]"):
        make_sft_step(graphdef, optimizer)(state, {k: v for k, v in batch.items() if k != "loss_mask"})


def test_micro_batches_equal_one_large_batch(split_model):
    graphdef, params = split_model
    # Plain SGD with lr 1: the update is exactly the gradient, so parameters show any gradient difference.
    sgd = Optimizer(tx=optax.sgd(1.0), learning_rate=optax.constant_schedule(1.0), frozen=nnx.Nothing())
    rows = [(3, 4), (1, 8), (5, 1), (2, 3)]  # ragged: 12 and 4 loss tokens in the two halves
    # Text only: micro-batches with images run in the `training` fixture (compiling both here is slow on CPU).
    micro = [make_batch(rows[:2], seed=1, images=False), make_batch(rows[2:], seed=2, images=False)]
    full = {k: np.concatenate([m[k] for m in micro], axis=1 if k == "position_ids" else 0) for k in micro[0]}

    results = []
    for batch in (full, stack_micro_batches(micro)):
        _, state = create_train_state(nnx.merge(graphdef, fresh(params)), sgd, 0)
        state, metrics = make_sft_step(graphdef, sgd)(state, batch)
        results.append((flat(state.params), jax.device_get(metrics)))
    (full_params, full_metrics), (micro_params, micro_metrics) = results
    assert full_metrics["tokens"] == micro_metrics["tokens"] == 16
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(micro_metrics[key], full_metrics[key], rtol=1e-6)
    before = flat(params)
    for k in before:
        np.testing.assert_allclose(micro_params[k], full_params[k], rtol=1e-6, atol=1e-6, err_msg=k)
        if not k.startswith("visual"):
            assert not np.array_equal(full_params[k], before[k]), f"{k} got no gradient"


@pytest.fixture(scope="module")
def training(split_model):
    """30 AdamW steps on one small batch in two micro-batches: bf16 forward, fp32 master weights, vision frozen."""
    _, params = split_model
    graphdef, _ = split_model_of(dtype=jnp.bfloat16)
    optimizer = make_optimizer(dict(learning_rate=1e-2, schedule="cosine", warmup_ratio=0.1, total_steps=30,
                                    weight_decay=0.01, freeze=(r"visual/.*",)))
    _, state = create_train_state(nnx.merge(graphdef, fresh(params)), optimizer, 0, param_dtype=jnp.float32)
    step = make_sft_step(graphdef, optimizer, compute_dtype=jnp.bfloat16)
    # Two micro-batches of one row each, every one with its own image.
    micro = [make_batch([(3, 5)], seed=3), make_batch([(2, 7)], seed=4)]
    batch = stack_micro_batches(micro)
    history = []
    for _ in range(30):
        state, metrics = step(state, batch)
        history.append(metrics)
    return {"graphdef": graphdef, "optimizer": optimizer, "step": step, "batch": batch, "micro": micro,
            "before": flat(params),
            "state": state, "metrics": jax.device_get(history)}


def test_sft_memorises_a_small_batch(training):
    losses = [m["loss"] for m in training["metrics"]]
    assert losses[0] > 3.0
    assert losses[-1] < losses[0] / 50
    assert int(training["state"].step) == 30
    assert all(m["tokens"] == 12 for m in training["metrics"])
    for i, m in enumerate(training["metrics"]):
        check_finite(m, i)
    lrs = [m["lr"] for m in training["metrics"]]
    np.testing.assert_allclose(lrs[:4], [0.0, 1e-2 / 3, 2e-2 / 3, 1e-2], rtol=1e-6)


def test_frozen_vision_tower_is_bit_identical(training):
    before, after = training["before"], flat(training["state"].params)
    assert any(k.startswith("visual") for k in before)
    for k in before:
        if k.startswith("visual"):
            assert before[k].tobytes() == after[k].tobytes(), k
        else:
            assert not np.allclose(before[k], after[k]), f"{k} did not change"


def test_bf16_compute_keeps_fp32_master_weights(training, split_model):
    graphdef32, params = split_model
    state = training["state"]
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim} == {jnp.dtype(jnp.float32)}
    loss = jax.jit(sft_loss, static_argnums=0)
    loss_sum, count = np.sum([loss(graphdef32, params, m) for m in training["micro"]], axis=0)
    bf16_loss, fp32_loss = float(training["metrics"][0]["loss"]), float(loss_sum / count)
    assert bf16_loss == pytest.approx(fp32_loss, rel=2e-2)
    assert bf16_loss != pytest.approx(fp32_loss, rel=1e-5)  # the forward did run in bf16


def test_nan_is_reported_with_its_step(training, split_model):
    _, params = split_model
    _, state = create_train_state(nnx.merge(training["graphdef"], fresh(params)), training["optimizer"], 0)
    history = []
    for i in range(4):
        if i == 2:
            state = state.replace(params=jax.tree_util.tree_map_with_path(
                lambda kp, p: p * np.nan if path_str(kp).startswith("lm_head") else p, state.params))
        state, metrics = training["step"](state, training["batch"])
        history.append(metrics)
    history = jax.device_get(history)
    assert [bool(m["finite"]) for m in history] == [True, True, False, False]
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(loss=nan\) and gradient .* at step 2"):
        for i, m in enumerate(history):
            check_finite(m, i)
