"""Training speed: cpt-jax's SFT step vs the transformers model with torch.optim.AdamW, and the RFT update's time.

    python benchmarks/bench_train.py --size 40m --json train_40m.json

One SFT step is forward, backward, global-norm clipping at 1.0 and AdamW (lr 1e-5, no weight decay) on the same
right-padded batch with one image per row and the loss on the answer tokens, fp32 on CPU; transformers uses sdpa
attention. Each side takes one warm-up step (ours includes compilation, reported as `jax_compile_s`), then
`timed_runs` steps. Both first-step losses are reported, as a check that the two sides compute the same thing.
The RFT update (`RFTLearner.update`: policy log-probs, PPO-clip + KL loss, backward, AdamW) is timed on G samples
of each prompt. MFU = analytic model FLOPs of a step / step time / the measured matmul peak. The step's text matmuls
are also timed alone (jnp and torch, same shapes): the SFT ratio cannot exceed the reference step's time over the
time of our matmuls by themselves (`ratio_bound_at_our_matmuls`).
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runnable as a script from any directory

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.bench_rollout import prompts  # noqa: E402
from cpt_jax.models.qwen2_5_vl import get_rope_index, vision_inputs  # noqa: E402
from cpt_jax.train.optimizer import make_optimizer  # noqa: E402
from cpt_jax.train.rft import RFTConfig, RFTLearner  # noqa: E402
from cpt_jax.train.sft import make_sft_step  # noqa: E402
from cpt_jax.train.state import create_train_state  # noqa: E402

LEARNING_RATE, MAX_GRAD_NORM = 1e-5, 1.0


def sft_batch(size: common.Size, config, seed: int = 0) -> dict:
    """Right-padded rows of `sft_length` tokens or a few less: prompt text, an image, the answer (the loss tokens)."""
    rng = np.random.default_rng(seed)
    length = size.sft_length
    ids, mask, loss_mask = (np.zeros((size.batch, length), np.int32) for _ in range(3))
    for i in range(size.batch):
        prompt = common.prompt_ids(rng, size.grid, int(rng.integers(4, 9)), int(rng.integers(4, 9)))
        answer = rng.integers(0, common.TEXT_VOCAB, length - len(prompt) - int(rng.integers(0, 4))).tolist()
        n = len(prompt) + len(answer)
        ids[i, :n], mask[i, :n], loss_mask[i, len(prompt):n] = prompt + answer, 1, 1
    grid = np.array([size.grid] * size.batch)
    pixel_values = common.pixels(rng, size.grid, size.batch, config.vision.patch_dim)
    position_ids, _ = get_rope_index(ids, grid, mask, config)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": np.asarray(position_ids, np.int32),
            "loss_mask": loss_mask, "pixel_values": pixel_values, "image_grid_thw": grid}


def jax_sft(model, batch, size: common.Size) -> dict:
    optimizer = make_optimizer({"learning_rate": LEARNING_RATE, "max_grad_norm": MAX_GRAD_NORM})
    graphdef, state = create_train_state(model, optimizer, 0)
    step = make_sft_step(graphdef, optimizer)
    inputs = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "position_ids", "loss_mask")}
    inputs["vision"] = jax.tree.map(jnp.asarray, vision_inputs(batch["pixel_values"], batch["image_grid_thw"],
                                                               model.config.vision))
    times, losses = [], []
    for _ in range(size.timed_runs + 1):
        start = time.perf_counter()
        state, metrics = step(state, inputs)
        losses.append(float(metrics["loss"]))  # the host read waits for the step
        times.append(time.perf_counter() - start)
    return {"compile_s": times[0], "step_s": times[1:], "first_loss": losses[0]}


def torch_sft(reference, batch, size: common.Size) -> dict:
    import torch

    reference.train()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0)
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.as_tensor(batch["attention_mask"], dtype=torch.long),
              "pixel_values": torch.as_tensor(batch["pixel_values"]),
              "image_grid_thw": torch.as_tensor(batch["image_grid_thw"]),
              "mm_token_type_ids": (ids == common.IMAGE).long()}
    # Logits at i predict token i + 1, counted where loss_mask[i + 1] (and the attention mask) is set.
    weight = torch.as_tensor(batch["loss_mask"] * batch["attention_mask"], dtype=torch.float32)[:, 1:]
    targets = ids[:, 1:]

    def step():
        logits = reference(**inputs).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
        loss = -(weight * logp).sum() / weight.sum().clamp(min=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    times, losses = [], []
    for _ in range(size.timed_runs + 1):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    return {"first_step_s": times[0], "step_s": times[1:], "first_loss": losses[0]}


def jax_rft(config, size: common.Size) -> dict:
    """Time of `RFTLearner.update` on `rft_prompts` prompts x `rft_samples` responses of `rft_response` tokens."""
    model = common.build_model(config, seed=1)
    optimizer = make_optimizer({"learning_rate": LEARNING_RATE, "max_grad_norm": MAX_GRAD_NORM})
    graphdef, state = create_train_state(model, optimizer, 0)
    rft = RFTConfig(num_samples=size.rft_samples, max_new_tokens=size.rft_response)
    learner = RFTLearner(graphdef, rft)
    rollout_size = common.Size(**{**size.__dict__, "batch": size.rft_prompts})
    ids, mask, pixel_values, grid = prompts(rollout_size, config.vision.patch_dim, seed=1)
    position_ids, _ = get_rope_index(ids, grid, mask, config)
    batch_prompts = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask, jnp.int32),
                     "position_ids": jnp.asarray(position_ids, jnp.int32),
                     "vision": jax.tree.map(jnp.asarray, vision_inputs(pixel_values, grid, config.vision))}
    rows = size.rft_prompts * size.rft_samples
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, common.TEXT_VOCAB, (rows, size.rft_response)).astype(np.int32)
    lengths = rng.integers(size.rft_response // 2, size.rft_response + 1, rows)
    rewards = rng.random(rows).astype(np.float32)
    start = time.perf_counter()
    batch = jax.block_until_ready(learner.prepare(state.params, state.params, batch_prompts, tokens, lengths,
                                                  rewards))
    prepare_first_s = time.perf_counter() - start
    times = []
    for _ in range(size.timed_runs + 1):
        start = time.perf_counter()
        state, metrics = learner.update(state, [batch], optimizer)
        float(metrics["loss"])
        times.append(time.perf_counter() - start)
    flops = 3 * common.rft_forward_flops(model, size.rft_prompts, ids.shape[1], size.rft_samples, size.rft_response,
                                         size.grid)
    return {"rft_prompts": size.rft_prompts, "rft_samples": size.rft_samples, "rft_response": size.rft_response,
            "rft_prompt_length": int(ids.shape[1]), "rft_prepare_first_s": prepare_first_s,
            "rft_update_first_s": times[0], "rft_update_s": times[1:],
            "rft_update_median_s": float(np.median(times[1:])), "rft_model_flops": flops}


def run(size: common.Size, argv: list[str]) -> dict:
    config = common.model_config(size)
    model = common.build_model(config)
    batch = sft_batch(size, config)
    result = {"size": size.name, "batch": size.batch, "max_new_tokens": size.max_new_tokens,
              "sft_length": size.sft_length, "loss_tokens": int((batch["loss_mask"][:, 1:]).sum()),
              "image_grid_thw": list(size.grid), "dtype": "float32",
              "reference": f"transformers + torch.optim.AdamW, {common.REFERENCE_ATTENTION}",
              "config": config.to_hf(), "params": common.count_params(model), **common.environment(argv)}
    result["limits"] = common.limits(size)
    with common.scratch_dir() as workdir:
        reference = common.hf_reference(model, workdir)  # before our step donates the model's arrays
    flops = 3 * common.forward_flops(model, size.batch, size.sft_length, size.batch, size.grid)
    ours = jax_sft(model, batch, size)
    theirs = torch_sft(reference, batch, size)
    jax_s, ref_s = float(np.median(ours["step_s"])), float(np.median(theirs["step_s"]))
    tokens = size.batch * size.sft_length
    peak = result["limits"]["matmul_peak_flops"]
    result.update(
        jax_tokens_per_s=tokens / jax_s, reference_tokens_per_s=tokens / ref_s, ratio=ref_s / jax_s,
        ratio_best=min(theirs["step_s"]) / min(ours["step_s"]),
        jax_step_s=ours["step_s"], reference_step_s=theirs["step_s"], jax_compile_s=ours["compile_s"],
        reference_first_step_s=theirs["first_step_s"], jax_first_loss=ours["first_loss"],
        reference_first_loss=theirs["first_loss"])
    result["limits"].update(model_flops_per_step=flops, jax_mfu=flops / jax_s / peak,
                            reference_mfu=flops / ref_s / peak)
    # What the step's text matmuls cost alone: the SFT ratio cannot pass reference step / our matmuls' time.
    floor = common.matmul_floor(common.text_matmuls(model, size.batch * size.sft_length))
    result["limits"].update(floor, matmul_share_of_flops=floor["matmul_flops"] / flops,
                            jax_matmul_share_of_step=floor["jax_matmul_s"] / jax_s,
                            reference_matmul_share_of_step=floor["torch_matmul_s"] / ref_s,
                            ratio_bound_at_our_matmuls=ref_s / floor["jax_matmul_s"])
    rft = jax_rft(config, size)
    result.update(rft)
    result["limits"]["rft_mfu"] = rft["rft_model_flops"] / rft["rft_update_median_s"] / peak
    return result


def main(argv: list[str] | None = None) -> dict:
    return common.main(run, "benchmarks/bench_train.py", __doc__.splitlines()[0],
                       ("jax_tokens_per_s", "reference_tokens_per_s", "ratio", "jax_compile_s", "rft_update_median_s"),
                       ("matmul_peak_flops", "jax_mfu", "reference_mfu", "jax_matmul_s", "torch_matmul_s",
                        "ratio_bound_at_our_matmuls"), argv=argv)

if __name__ == "__main__":
    main()
