"""Rollout speed: cpt-jax's in-graph sampler vs transformers' `generate`, same weights, prompts and sampling.

    python benchmarks/bench_rollout.py --size 40m --json rollout_40m.json

Both sides sample `max_new_tokens` tokens (no end-of-sequence stop) for a batch of left-padded prompts with one image
each, temperature 1.0, top-p 0.99, fp32 on CPU; transformers uses sdpa attention. Each side runs once to warm up
(our first call includes compilation, reported as `jax_compile_s`), then `timed_runs` times; tokens/s counts
generated tokens over the whole call (vision tower and prefill included). The JSON also holds the decode limit:
bytes a decode step must read vs the rate this machine streams weights through the step's own matmuls, FLOPs vs
the measured matmul peak, and the highest ratio to the reference that limit allows (`limits.ratio_bound`).
"""

from __future__ import annotations

import itertools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runnable as a script from any directory

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from cpt_jax.rl.sampling import DEFAULT_LENGTH_BUCKETS, generate  # noqa: E402

TEMPERATURE, TOP_P = 1.0, 0.99


def prompts(size: common.Size, patch_dim: int, seed: int = 0):
    """Left-padded ragged prompts (B, L) with one image each, their mask, pixel rows and grids."""
    rng = np.random.default_rng(seed)
    rows = [common.prompt_ids(rng, size.grid, int(rng.integers(4, 9)), int(rng.integers(8, 13)))
            for _ in range(size.batch)]
    length = max(map(len, rows))
    ids, mask = np.zeros((size.batch, length), np.int64), np.zeros((size.batch, length), np.int64)
    for i, row in enumerate(rows):
        ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
    grid = np.array([size.grid] * size.batch)
    return ids, mask, common.pixels(rng, size.grid, size.batch, patch_dim), grid


def run(size: common.Size, argv: list[str]) -> dict:
    import torch

    config = common.model_config(size)
    model = common.build_model(config)
    ids, mask, pixel_values, grid = prompts(size, config.vision.patch_dim)
    tokens = size.batch * size.max_new_tokens
    result = {"size": size.name, "batch": size.batch, "max_new_tokens": size.max_new_tokens,
              "prompt_length": int(ids.shape[1]), "image_grid_thw": list(size.grid), "temperature": TEMPERATURE,
              "top_p": TOP_P, "dtype": "float32", "reference": f"transformers generate, {common.REFERENCE_ATTENTION}",
              "config": config.to_hf(), "params": common.count_params(model), **common.environment(argv)}
    result["limits"] = common.limits(size)

    seeds = itertools.count()

    def ours(new_tokens=size.max_new_tokens):  # a fresh key per call, as a training loop draws one per rollout
        return generate(model, ids, mask, pixel_values, grid, max_new_tokens=new_tokens,
                        temperature=TEMPERATURE, top_p=TOP_P, rng=jax.random.key(next(seeds))).tokens

    compile_s, jax_times = common.timed(ours, size.timed_runs)
    # A call's fixed part: the vision tower, the prefill over the bucketed prompt and the first sampled token.
    _, prefill_times = common.timed(lambda: ours(1), size.timed_runs)
    out = np.asarray(ours())
    assert out.shape == (size.batch, size.max_new_tokens), out.shape

    with common.scratch_dir() as workdir:
        reference = common.hf_reference(model, workdir)
    reference.generation_config.eos_token_id = None  # sample every token, as our call with no eos ids does
    inputs = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask),
              "pixel_values": torch.as_tensor(pixel_values), "image_grid_thw": torch.as_tensor(grid),
              "mm_token_type_ids": torch.as_tensor((ids == config.image_token_id).astype(np.int64))}

    def theirs():
        with torch.no_grad():
            return reference.generate(**inputs, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                                      max_new_tokens=size.max_new_tokens, pad_token_id=0)

    ref_first_s, ref_times = common.timed(theirs, size.timed_runs)
    generated = theirs().shape[1] - ids.shape[1]
    assert generated == size.max_new_tokens, f"transformers generated {generated} tokens"

    jax_s, ref_s = float(np.median(jax_times)), float(np.median(ref_times))
    prefill_s = float(np.median(prefill_times))
    result.update(jax_prefill_s=prefill_s, jax_decode_step_s=(jax_s - prefill_s) / (size.max_new_tokens - 1))
    # The median is the headline; the best-of ratio is less sensitive to other processes on a shared machine.
    result.update(jax_tokens_per_s=tokens / jax_s, reference_tokens_per_s=tokens / ref_s, ratio=ref_s / jax_s,
                  ratio_best=min(ref_times) / min(jax_times),
                  jax_compile_s=compile_s, jax_call_s=jax_times, reference_first_call_s=ref_first_s,
                  reference_call_s=ref_times)

    # Decode limit: a step reads every text weight and the whole cache; the cache spans the bucketed prompt. The rate
    # at which this machine streams weights through matmuls is measured with the step's own matmuls alone, each
    # weight its own array (`decode_matmul_floor`): a copy's bandwidth (`memory_bandwidth_bytes_per_s`, one read and
    # one write) understates what reads alone reach, and one matrix timed again and again is served from the cache.
    cache = min(b for b in DEFAULT_LENGTH_BUCKETS if b >= ids.shape[1]) + size.max_new_tokens - 1
    step_bytes = common.decode_bytes_per_step(model, size.batch, cache)
    step_flops = common.forward_flops(model, size.batch, 1, 0, size.grid) + 4 * size.batch * cache * (
        config.text.hidden_size * config.text.num_hidden_layers)
    lim = result["limits"]
    lim.update(common.decode_matmul_floor(model, size.batch))
    lim["decode_weight_bytes_per_s"] = lim["decode_weight_bytes"] / lim["decode_jax_matmul_s"]
    step_bound_s = max(step_bytes / lim["decode_weight_bytes_per_s"], step_flops / lim["matmul_peak_flops"])
    bound = size.batch / step_bound_s
    lim.update(decode_bytes_per_step=step_bytes, decode_bytes_per_token=step_bytes / size.batch,
               decode_flops_per_step=step_flops, decode_bound_tokens_per_s=bound,
               jax_fraction_of_decode_bound=result["jax_tokens_per_s"] / bound,
               decode_step_fraction_of_bound=step_bound_s / result["jax_decode_step_s"],
               # A sampler doing nothing but reading its weights and cache at that rate, against the reference.
               ratio_bound=bound / result["reference_tokens_per_s"])
    return result


def main(argv: list[str] | None = None) -> dict:
    return common.main(run, "benchmarks/bench_rollout.py", __doc__.splitlines()[0],
                       ("jax_tokens_per_s", "reference_tokens_per_s", "ratio", "jax_compile_s"),
                       ("decode_bound_tokens_per_s", "jax_fraction_of_decode_bound", "decode_step_fraction_of_bound",
                        "ratio_bound"), argv=argv)

if __name__ == "__main__":
    main()
