"""Shared pieces of the benchmarks: model sizes, identical weights for JAX and transformers, inputs, timing, the
machine's measured limits (matmul peak, memory bandwidth) and analytic model FLOPs.

Both sides run fp32 on CPU. Our model is drawn once with numpy, written with `save_hf_checkpoint` and loaded by
transformers' `from_pretrained` (sdpa attention), so both hold bit-identical weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import tempfile
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, save_hf_checkpoint
from cpt_jax.train.optimizer import path_str

IMAGE, VIDEO, VSTART, VEND, IM_START, IM_END = 8005, 8006, 8003, 8004, 8001, 8002
TEXT_VOCAB = 8000  # ordinary text ids are drawn below the special ids
REFERENCE_ATTENTION = "sdpa"


@dataclasses.dataclass(frozen=True)
class Size:
    """A benchmark size: the model and the workload run on it."""

    name: str
    text: dict
    vision: dict
    grid: tuple[int, int, int]  # (t, h, w) patches of the one image per prompt
    batch: int  # prompts per rollout batch / rows per SFT batch
    max_new_tokens: int
    sft_length: int  # SFT row length (prompt + image + answer)
    rft_prompts: int
    rft_samples: int
    rft_response: int
    timed_runs: int
    peak_matmul_n: int  # side of the square matmul measuring peak FLOP/s
    bandwidth_mib: int  # size of the array streamed to measure memory bandwidth


SIZES = {
    "tiny": Size(
        name="tiny",
        text=dict(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
        vision=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, fullatt_block_indexes=[1]),
        grid=(1, 4, 4), batch=2, max_new_tokens=8, sft_length=32, rft_prompts=2, rft_samples=2, rft_response=8,
        timed_runs=1, peak_matmul_n=512, bandwidth_mib=16),
    "40m": Size(
        name="40m",
        text=dict(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12]),
        vision=dict(depth=4, hidden_size=128, num_heads=2, intermediate_size=256, fullatt_block_indexes=[3]),
        grid=(1, 8, 8), batch=8, max_new_tokens=64, sft_length=128, rft_prompts=2, rft_samples=4, rft_response=64,
        timed_runs=3, peak_matmul_n=2048, bandwidth_mib=256),
}


def model_config(size: Size) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL configuration of `size` (real patch size 14, window 112, M-RoPE)."""
    return Qwen2_5_VLConfig.from_hf({
        "model_type": "qwen2_5_vl",
        "image_token_id": IMAGE, "video_token_id": VIDEO,
        "vision_start_token_id": VSTART, "vision_end_token_id": VEND,
        "tie_word_embeddings": False,
        "text_config": dict({k: v for k, v in size.text.items() if k != "mrope_section"}, rms_norm_eps=1e-6,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                             "mrope_section": size.text["mrope_section"]},
                            bos_token_id=IM_START, eos_token_id=IM_END),
        "vision_config": dict(size.vision, out_hidden_size=size.text["hidden_size"], window_size=112,
                              tokens_per_second=2),
    })


def build_model(config: Qwen2_5_VLConfig, seed: int = 0) -> Qwen2_5_VL:
    """fp32 model with weights drawn in numpy (std 0.02, norms 1): JAX random init would compile per shape."""
    abstract = nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0)))
    graphdef, shapes = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(key_path, x):
        if path_str(key_path).endswith("scale/value"):
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(0.02 * rng.standard_normal(x.shape, np.float32))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, shapes))


def count_params(model: Qwen2_5_VL) -> dict[str, int]:
    params = nnx.state(model, nnx.Param)
    sizes = {path_str(p): int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    vision = sum(n for p, n in sizes.items() if p.startswith("visual"))
    return {"total": sum(sizes.values()), "vision": vision, "text": sum(sizes.values()) - vision}


def hf_reference(model: Qwen2_5_VL, workdir: str):
    """transformers' model (fp32, sdpa attention) loaded from our `save_hf_checkpoint` output."""
    import torch
    import transformers

    path = save_hf_checkpoint(model, os.path.join(workdir, "hf"))
    return transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, attn_implementation=REFERENCE_ATTENTION, dtype=torch.float32)


def prompt_ids(rng: np.random.Generator, grid, n_before: int, n_after: int) -> list[int]:
    """A chat-like prompt: text, one image's placeholders (one per merged token), more text."""
    image = [VSTART] + [IMAGE] * (int(np.prod(grid)) // 4) + [VEND]
    return ([IM_START] + rng.integers(0, TEXT_VOCAB, n_before).tolist() + image
            + rng.integers(0, TEXT_VOCAB, n_after).tolist())


def pixels(rng: np.random.Generator, grid, count: int, patch_dim: int) -> np.ndarray:
    return rng.standard_normal((count * int(np.prod(grid)), patch_dim)).astype(np.float32)


def timed(fn: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    """(seconds of the first call, which includes compilation, and of each of `runs` further calls)."""
    def once():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start

    first = once()
    return first, [once() for _ in range(runs)]


# The best of many probes: one probe moved by 25% between runs (171 vs 213 GFLOP/s), and the MFU verdict with it.
PROBE_RUNS = 20


def matmul_peak_flops(n: int, runs: int = PROBE_RUNS) -> float:
    """Best fp32 FLOP/s of an n x n x n jnp matmul (2 n^3 FLOPs): the machine's practical compute ceiling."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    matmul = jax.jit(lambda x, y: x @ y)
    _, times = timed(lambda: matmul(a, a), runs)
    return 2 * n**3 / min(times)


def torch_best_s(fn: Callable[[], object], runs: int) -> float:
    """Best seconds of `runs` calls of a torch `fn` after one warm-up call (torch runs eagerly: no waiting needed)."""
    fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def torch_matmul_flops(n: int, runs: int = PROBE_RUNS) -> float:
    """The same measurement with torch, to tell a backend difference from a model-code difference."""
    import torch

    a = torch.randn(n, n)
    return 2 * n**3 / torch_best_s(lambda: a @ a, runs)


def memory_bandwidth(nbytes: int, runs: int = PROBE_RUNS) -> float:
    """Best bytes/s of streaming a large fp32 array through `x + 1` (one read and one write per element)."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    add = jax.jit(lambda v: v + 1.0)
    _, times = timed(lambda: add(x), runs)
    return 2 * nbytes / min(times)


def limits(size: Size) -> dict:
    """The machine's measured ceilings, taken in the same process just before the benchmark."""
    return {"matmul_peak_flops": matmul_peak_flops(size.peak_matmul_n),
            "torch_matmul_flops": torch_matmul_flops(size.peak_matmul_n),
            "matmul_n": size.peak_matmul_n,
            "memory_bandwidth_bytes_per_s": memory_bandwidth(size.bandwidth_mib * 2**20),
            "bandwidth_array_mib": size.bandwidth_mib}


def _matmul_params(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    """Weights that multiply activations (kernels), excluding embeddings, norms and biases."""
    return sum(int(np.prod(s)) for p, s in shapes.items()
               if p.startswith(prefix) and p.endswith("kernel/value"))


def param_shapes(model: Qwen2_5_VL) -> dict[str, tuple[int, ...]]:
    params = nnx.state(model, nnx.Param)
    return {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def forward_flops(model: Qwen2_5_VL, rows: int, length: int, images: int, grid) -> float:
    """Analytic forward FLOPs: 2 per weight per token for every matmul (text layers, lm_head, vision blocks, patch
    embedding, merger) plus causal self-attention scores and values (2 L^2 D per layer and row, half of the
    full square) and full per-image vision attention (an upper bound: most vision blocks use windows)."""
    shapes = param_shapes(model)
    text, vision = model.config.text, model.config.vision
    patches = images * int(np.prod(grid))
    text_weights = _matmul_params(shapes, "language_model") + int(np.prod(shapes["lm_head/value"]))
    vision_blocks = _matmul_params(shapes, "visual/blocks") + int(np.prod(shapes["visual/patch_embed/value"]))
    merger = _matmul_params(shapes, "visual/merger")
    flops = 2 * rows * length * text_weights
    flops += 2 * rows * length**2 * text.hidden_size * text.num_hidden_layers
    flops += 2 * patches * vision_blocks + 2 * (patches // vision.merge_unit) * merger
    flops += 4 * images * int(np.prod(grid))**2 * vision.hidden_size * vision.depth
    return float(flops)


def rft_forward_flops(model: Qwen2_5_VL, prompts: int, prompt_length: int, samples: int, response_length: int,
                      grid) -> float:
    """Analytic forward FLOPs of the RFT log-probs as `response_logprobs` computes them: each prompt (and image)
    once, without logits, then its samples' responses, with logits, attending to the prompt and to themselves."""
    shapes = param_shapes(model)
    text = model.config.text
    lm_head = int(np.prod(shapes["lm_head/value"]))
    rows = prompts * samples
    flops = forward_flops(model, prompts, prompt_length, prompts, grid) - 2 * prompts * prompt_length * lm_head
    flops += 2 * rows * response_length * (_matmul_params(shapes, "language_model") + lm_head)
    flops += 2 * rows * text.hidden_size * text.num_hidden_layers * (
        2 * prompt_length * response_length + response_length**2)
    return float(flops)


def text_matmuls(model: Qwen2_5_VL, tokens: int) -> list[tuple[str, int, int, int, int]]:
    """The text decoder's weight matmuls of one training step on `tokens` tokens, as (kind, m, k, n, count), each an
    (m, k) x (k, n) product: per layer the q/k/v/o and MLP projections and once the lm_head, each as its forward
    x @ W, input gradient dy @ W^T and weight gradient x^T @ dy. Attention's score/value products and the vision
    tower are not in it."""
    text = model.config.text
    d, dh = text.hidden_size, text.head_dim
    projections = [(d, text.num_attention_heads * dh), (d, text.num_key_value_heads * dh),
                   (d, text.num_key_value_heads * dh), (text.num_attention_heads * dh, d),
                   (d, text.intermediate_size), (d, text.intermediate_size), (text.intermediate_size, d)]
    out = []
    for (k, n), count in [(p, text.num_hidden_layers) for p in projections] + [((d, text.vocab_size), 1)]:
        out += [("x@W", tokens, k, n, count), ("dy@W^T", tokens, n, k, count), ("x^T@dy", k, tokens, n, count)]
    return out


# Each kind's operands as the step holds them: x^T @ dy reads x stored (k, m), dy @ W^T reads W stored (n, k).
_MATMUL_KINDS = {
    "x@W": (lambda m, k, n: ((m, k), (k, n)), lambda a, b: a @ b, lambda a, b: a @ b),
    "dy@W^T": (lambda m, k, n: ((m, k), (n, k)), lambda a, b: a @ b.T, lambda a, b: a @ b.t()),
    "x^T@dy": (lambda m, k, n: ((k, m), (k, n)), lambda a, b: a.T @ b, lambda a, b: a.t() @ b),
}


def matmul_floor(matmuls, runs: int = PROBE_RUNS) -> dict:
    """Seconds the step's matmuls take alone, each timed as one jitted jnp op (best of `runs`) and with torch, so
    a step time can be set against what its matmuls cost on this machine by themselves."""
    import torch

    rng = np.random.default_rng(0)
    jax_s = torch_s = flops = 0.0
    for kind, m, k, n, count in matmuls:
        shapes, jax_op, torch_op = _MATMUL_KINDS[kind]
        a, b = (rng.standard_normal(shape, np.float32) for shape in shapes(m, k, n))
        fn, ja, jb = jax.jit(jax_op), jnp.asarray(a), jnp.asarray(b)
        jax_s += count * min(timed(lambda: fn(ja, jb), runs)[1])
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        torch_s += count * torch_best_s(lambda: torch_op(ta, tb), runs)
        flops += count * 2.0 * m * k * n
    return {"matmul_flops": flops, "jax_matmul_s": jax_s, "torch_matmul_s": torch_s}


def decode_matmul_floor(model: Qwen2_5_VL, rows: int, runs: int = PROBE_RUNS) -> dict:
    """Seconds one decode step's weight matmuls take alone: (rows, k) x (k, n) for every text kernel and the lm_head,
    jnp (one jitted call) and torch. Each weight is its own array, as in the model, so the probe streams the bytes a
    decode step streams; one matrix timed again and again would be served from the cache."""
    import torch

    rng = np.random.default_rng(0)
    shapes = [(k, n) for kind, _, k, n, count in text_matmuls(model, rows) if kind == "x@W" for _ in range(count)]
    weights = [rng.standard_normal(shape, np.float32) for shape in shapes]
    inputs = {k: rng.standard_normal((rows, k), np.float32) for k, _ in shapes}
    jw, jx = [jnp.asarray(w) for w in weights], {k: jnp.asarray(x) for k, x in inputs.items()}
    step = jax.jit(lambda xs, ws: [xs[w.shape[0]] @ w for w in ws])
    tw, tx = [torch.from_numpy(w) for w in weights], {k: torch.from_numpy(x) for k, x in inputs.items()}
    return {"decode_weight_bytes": 4.0 * sum(k * n for k, n in shapes),
            "decode_jax_matmul_s": min(timed(lambda: step(jx, jw), runs)[1]),
            "decode_torch_matmul_s": torch_best_s(lambda: [tx[w.shape[0]] @ w for w in tw], runs)}


def decode_bytes_per_step(model: Qwen2_5_VL, rows: int, cache_size: int) -> float:
    """Bytes one decode step must read at least: every text weight but the embedding table (one row per token) and
    the whole fixed-size KV cache, fp32."""
    shapes = param_shapes(model)
    text = model.config.text
    weights = sum(int(np.prod(s)) for p, s in shapes.items()
                  if not p.startswith("visual") and "embed_tokens" not in p)
    kv = 2 * text.num_hidden_layers * rows * cache_size * text.num_key_value_heads * text.head_dim
    return 4.0 * (weights + rows * text.hidden_size + kv)


def environment(argv: list[str]) -> dict:
    """Versions, machine and load, and the command that produced a result."""
    import torch

    names = ("jax", "jaxlib", "flax", "optax", "transformers", "torch", "numpy")
    return {
        "versions": {"python": platform.python_version(),
                     **{n: importlib.metadata.version(n) for n in names}},
        "machine": {"cpu": _cpu_model(), "cores_available": len(os.sched_getaffinity(0)),
                    "cores_total": os.cpu_count(), "load_average_1_5_15": list(os.getloadavg()),
                    "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend(),
                    "jax_devices": len(jax.devices())},
        "command": " ".join(shlex.quote(a) for a in ["python", *argv]),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="cpt_jax_bench_")


def main(run: Callable[[Size, list[str]], dict], script: str, description: str, summary: Sequence[str],
         limits_summary: Sequence[str] = (), argv: list[str] | None = None) -> dict:
    """The command line of a benchmark: `--size`, `--json OUT`; runs `run(size, command)`, writes the result and
    prints the `summary` keys (and the `limits_summary` keys of its limits)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=sorted(SIZES), default="40m")
    parser.add_argument("--json", type=pathlib.Path, help="where to write the result")
    args = parser.parse_args(argv)
    result = run(SIZES[args.size], [script, *argv])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in summary}))
    if limits_summary:
        print(json.dumps({k: result["limits"][k] for k in limits_summary}))
    return result
