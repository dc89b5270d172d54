"""Tiny sharded programs shared by the sharding tests and by each process of the multi-process test.

Every process builds the same global rows from fixed seeds and keeps its own slice of them (with its own image
patches, padded on its own), as the data pipeline does on several hosts.

    python -m tests.sharding_programs --process-id I --num-processes 2 --coordinator localhost:PORT
runs one process of the 2-process test (2 CPU devices each, gloo collectives); process 0 prints a summary line.
"""

from __future__ import annotations

import argparse
import json
import os

SFT_ROWS, SFT_LENGTH, GRID = 8, 20, (1, 4, 4)  # one 4x4-patch image per row: 4 merged image tokens
PROMPTS, SAMPLES, PROMPT_LENGTH, RESPONSE_LENGTH = 8, 2, 8, 6
# XLA:CPU without LLVM optimisation and fusion emitters compiles these programs 4x faster; the numbers do not change
# at test tolerances.
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
SUMMARY = "SUMMARY "
# Token ids of tests/models/qwen2_5_vl/reference.py, whose tiny configuration is repeated in `tiny_config` so that
# the worker processes do not import torch.
IMAGE, VSTART, VEND, TEXT_VOCAB = 505, 503, 504, 500


def tiny_config():
    from cpt_jax.models.qwen2_5_vl import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig.from_hf({
        "model_type": "qwen2_5_vl", "image_token_id": IMAGE, "video_token_id": 506, "vision_start_token_id": VSTART,
        "vision_end_token_id": VEND, "tie_word_embeddings": False,
        "text_config": {
            "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            "bos_token_id": 500, "eos_token_id": 502,
        },
        "vision_config": {
            "depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48, "out_hidden_size": 64,
            "fullatt_block_indexes": [1], "window_size": 112, "tokens_per_second": 2,
        },
    })


def tiny_params(seed: int = 0):
    """(graphdef, params) of the tiny reference model with O(0.1) weights drawn with numpy (no per-shape init
    programs to compile)."""
    import jax
    import numpy as np
    from flax import nnx

    from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL
    from cpt_jax.train.optimizer import path_str

    abstract = nnx.eval_shape(lambda: Qwen2_5_VL(tiny_config(), rngs=nnx.Rngs(0)))
    graphdef, shapes = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(seed)

    def draw(key_path, x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return 1.0 + 0.1 * noise if path_str(key_path).endswith("scale/value") else 0.1 * noise

    return graphdef, jax.tree_util.tree_map_with_path(draw, shapes)


def sgd():
    """lr 1: the update is exactly minus the gradient; momentum gives a state shaped like the parameters."""
    import optax
    from flax import nnx

    from cpt_jax.train.optimizer import Optimizer

    return Optimizer(tx=optax.sgd(1.0, momentum=0.5), learning_rate=optax.constant_schedule(1.0),
                     frozen=nnx.Nothing())


def sft_batch(rows: slice = slice(None), seed: int = 0, images: bool = True) -> dict:
    """Rows `rows` of a fixed global SFT batch: text, an image, text, then the answer (the loss tokens).

    Without `images` the image tokens are text tokens and the batch has no vision inputs.
    """
    import numpy as np

    from cpt_jax.models.qwen2_5_vl import get_rope_index, vision_inputs

    config = tiny_config()
    rng = np.random.default_rng(seed)
    ids = np.zeros((SFT_ROWS, SFT_LENGTH), np.int32)
    attention, loss_mask = np.zeros_like(ids), np.zeros_like(ids)
    for i in range(SFT_ROWS):
        n_prompt, n_answer = rng.integers(1, 5), rng.integers(2, 6)
        prompt = (rng.integers(0, TEXT_VOCAB, n_prompt).tolist() + [VSTART] + [IMAGE] * 4 + [VEND]
                  + rng.integers(0, TEXT_VOCAB, 2).tolist())
        tokens = prompt + rng.integers(0, TEXT_VOCAB, n_answer).tolist()
        ids[i, :len(tokens)], attention[i, :len(tokens)] = tokens, 1
        loss_mask[i, len(prompt):len(tokens)] = 1
    pixels = rng.normal(size=(SFT_ROWS, int(np.prod(GRID)), config.vision.patch_dim)).astype(np.float32)
    ids, attention, loss_mask, pixels = ids[rows], attention[rows], loss_mask[rows], pixels[rows]
    if not images:
        ids = np.where(ids >= TEXT_VOCAB, ids % TEXT_VOCAB, ids)
    grid = np.array([GRID] * len(ids)) if images else None
    position_ids, _ = get_rope_index(ids, grid, attention, config)
    return {"input_ids": ids, "attention_mask": attention, "position_ids": np.asarray(position_ids, np.int32),
            "loss_mask": loss_mask,
            "vision": vision_inputs(pixels.reshape(-1, config.vision.patch_dim), grid, config.vision)
            if images else None}


def rft_rollouts(prompts: slice = slice(None), seed: int = 1):
    """Prompts `prompts` of a fixed text-only rollout batch, left-padded, and their samples' tokens, lengths and
    rewards (rows b*SAMPLES .. b*SAMPLES+SAMPLES-1 belong to prompt b)."""
    import numpy as np

    from cpt_jax.models.qwen2_5_vl import get_rope_index

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TEXT_VOCAB, (PROMPTS, PROMPT_LENGTH)).astype(np.int32)
    mask = np.ones_like(ids)
    for b in range(PROMPTS):
        mask[b, :rng.integers(0, PROMPT_LENGTH - 2)] = 0
    ids = np.where(mask == 1, ids, 0)
    tokens = rng.integers(0, TEXT_VOCAB, (PROMPTS * SAMPLES, RESPONSE_LENGTH)).astype(np.int32)
    lengths = rng.integers(1, RESPONSE_LENGTH + 1, PROMPTS * SAMPLES).astype(np.int32)
    rewards = rng.integers(0, 2, PROMPTS * SAMPLES).astype(np.float32)
    rows = slice(*(None if i is None else i * SAMPLES for i in (prompts.start, prompts.stop)))
    ids, mask = ids[prompts], mask[prompts]
    position_ids, _ = get_rope_index(ids, None, mask, tiny_config())
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": np.asarray(position_ids, np.int32)}
    return batch, tokens[rows], lengths[rows], rewards[rows]


def run(layout, process_index: int = 0, process_count: int = 1, rft_logprobs=None) -> dict:
    """Logits (with images), one SFT step and one RFT update (PPO-clip + KL) of the tiny model on `layout`.

    Each process passes its share of the global rows. Only the logits compile the vision tower: its backward pass
    on every mesh would double the time of the tests. `rft_logprobs` (old, reference; global) skips recomputing
    them. Returns device values: the logits, the batch with images, the states and metrics.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from cpt_jax import sharding
    from cpt_jax.train.rft import RFTConfig, RFTLearner
    from cpt_jax.train.sft import make_sft_step
    from cpt_jax.train.state import create_train_state

    def share(total):
        size = total // process_count
        return slice(process_index * size, (process_index + 1) * size)

    graphdef, params = tiny_params()
    optimizer = sgd()

    def placed():
        return sharding.reshard(params, layout.shardings("params", params))

    images = sharding.global_batch(sft_batch(share(SFT_ROWS)), layout)
    batch = sharding.global_batch(sft_batch(share(SFT_ROWS), images=False), layout)
    forward = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["input_ids"], b["attention_mask"],
                                                          position_ids=b["position_ids"], vision=b["vision"]),
                      compiler_options=layout.compiler_options)
    with layout.activations():
        logits = forward(placed(), images)
    _, state = create_train_state(nnx.merge(graphdef, placed()), optimizer, 0, layout=layout)
    initial = state
    state, sft_metrics = make_sft_step(graphdef, optimizer, layout=layout)(state, batch)

    learner = RFTLearner(graphdef, RFTConfig(num_samples=SAMPLES), layout=layout)
    _, rft_state = create_train_state(nnx.merge(graphdef, placed()), optimizer, 0, layout=layout)
    prompts, tokens, lengths, rewards = rft_rollouts(share(PROMPTS))
    if rft_logprobs is None:
        reference = jax.jit(lambda p: jax.tree.map(lambda x: 0.9 * x, p))(rft_state.params)
        rft_batch = learner.prepare(rft_state.params, reference, prompts, tokens, lengths, rewards)
    else:
        rft_batch = sharding.global_batch(dict(
            prompts, response=tokens, advantages=np.asarray(learner.advantages(rewards)),
            response_mask=(np.arange(tokens.shape[1]) < lengths[:, None]).astype(np.int32),
            row_weight=np.ones(len(tokens), np.float32), old_logprobs=rft_logprobs[0],
            ref_logprobs=rft_logprobs[1]), layout)
    rft_state, rft_metrics = learner.update(rft_state, [rft_batch], optimizer)
    return {"logits": logits, "images": images, "initial": initial, "sft_state": state, "sft": sft_metrics,
            "rft_state": rft_state, "rft": rft_metrics,
            "rft_logprobs": (rft_batch["old_logprobs"], rft_batch["ref_logprobs"])}


def summary(out) -> dict:
    """What one process can report of `run`'s results: its rows of the logits, the metrics, and the sum and sum of
    squares of every parameter after each update (reduced over all processes)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cpt_jax import sharding
    from cpt_jax.train.optimizer import path_str

    moments = jax.jit(lambda tree: jax.tree.map(lambda x: jnp.stack([x.sum(), jnp.square(x).sum()]), tree))

    def scalar(x):
        return float(np.asarray(x.addressable_data(0)))

    result = {"logits": sharding.local_batch(out["logits"]).tolist()}
    for kind, keys in (("sft", ("loss", "grad_norm")), ("rft", ("loss", "grad_norm", "kl"))):
        result[kind] = {k: scalar(out[kind][k]) for k in keys}
        flat = jax.tree_util.tree_flatten_with_path(moments(out[f"{kind}_state"].params))[0]
        result[f"{kind}_params"] = {path_str(p): np.asarray(v.addressable_data(0)).tolist() for p, v in flat}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--coordinator", required=True)
    args = parser.parse_args()
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from cpt_jax import sharding

    sharding.maybe_initialize_distributed(True, coordinator_address=args.coordinator,
                                          num_processes=args.num_processes, process_id=args.process_id)
    # One slice per process: 'data' crosses the processes, 'fsdp' splits within each.
    layout = sharding.Layout(sharding.make_mesh(data=1, fsdp=2, tensor=1, dcn_data=2), compiler_options=FAST)
    result = summary(run(layout, jax.process_index(), jax.process_count()))
    if sharding.is_main_process():
        print(SUMMARY + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
