"""Ahead-of-time compilation for a TPU slice you do not have: does a configuration compile, and does it fit?

    JAX_PLATFORMS=cpu cpt-jax aot --config configs/qwen2_5_vl_7b_rft.py --topology v5p:2x2x2

The real model (the config.json in model.hf_dir, else the published model.name) is lowered and compiled, with the
config's mesh and the shapes of its largest buckets, for the TPU topology libtpu describes (`pip install -e
".[tpu]"`; no TPU is needed). For each program of the run (SFT: the step; RFT: the old/reference log-probs, the
gradient, the optimizer update, the rollout prefill and decode) it prints, per device: XLA's argument, output and
temporary memory, the arrays that stay in HBM while the program runs without being its arguments (optimizer state
during the gradient pass, the reference and training weights during rollouts), their total against the chip's HBM,
the model FLOPs counted from the shapes (XLA's cost analysis counts a scan over layers once), and the compile time.
It exits with status 1 when a program does not fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import time

# chip (device_kind) -> (name, HBM GiB per chip, peak bf16 TFLOP/s per chip)
CHIPS = {
    "TPU v4": ("v4", 32, 275),
    "TPU v5 lite": ("v5e", 16, 197),
    "TPU v5": ("v5p", 95, 459),
    "TPU v6 lite": ("v6e", 32, 918),
}
GiB = 1024**3


@dataclasses.dataclass
class Report:
    """One compiled program: per-device bytes, model FLOPs (whole program, all devices) and compile seconds."""

    program: str
    argument: int
    output: int
    alias: int
    temp: int
    resident: int
    flops: float
    compile_s: float

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.resident


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The padded shapes the programs are compiled for (the largest buckets of the config)."""

    sft_rows: int  # rows per SFT micro-batch
    sft_micro_batches: int
    length: int  # tokens per SFT row, and per prompt
    patches: int  # image patches per micro-batch
    image_patches: int  # patches of the largest image (full-attention segments)
    prompts: int  # prompts per RFT micro-batch
    samples: int
    response: int  # generated tokens


def shapes_of(config) -> Shapes:
    sft, rft, data = config.sft, config.rft, config.data
    if sft.batch_size % sft.micro_batches:
        raise ValueError(f"sft.batch_size={sft.batch_size} is not divisible by sft.micro_batches={sft.micro_batches}")
    return Shapes(sft_rows=sft.batch_size // sft.micro_batches, sft_micro_batches=sft.micro_batches,
                  length=max(data.length_buckets), patches=max(data.patch_buckets) if data.patch_buckets else 0,
                  image_patches=data.max_pixels // 14**2, prompts=rft.prompt_batch_size, samples=rft.num_samples,
                  response=rft.max_new_tokens)


# --- model FLOPs -----------------------------------------------------------------------------------------------

def text_flops(text, tokens: float, context: float) -> float:
    """Forward FLOPs of the decoder layers for `tokens` tokens each attending to `context` keys on average."""
    d, h, k, dh, f = (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim,
                      text.intermediate_size)
    per_token = 2 * d * dh * (2 * h + 2 * k) + 2 * 3 * d * f + 2 * 2 * h * dh * context
    return text.num_hidden_layers * per_token * tokens


def head_flops(text, tokens: float) -> float:
    return 2 * text.hidden_size * text.vocab_size * tokens


def vision_flops(vision, patches: float, image_patches: int) -> float:
    """Forward FLOPs of the vision tower for `patches` patches (window blocks attend within 8x8-patch windows,
    full-attention blocks within an image of `image_patches`)."""
    dv, fv = vision.hidden_size, vision.intermediate_size
    window = (vision.window_size // vision.patch_size) ** 2
    full = len(vision.fullatt_block_indexes)
    per_block = 2 * 4 * dv * dv + 2 * 3 * dv * fv
    attention = 4 * dv * ((vision.depth - full) * window + full * image_patches)
    merged = patches / vision.merge_unit
    wide = dv * vision.merge_unit
    return (patches * (2 * vision.patch_dim * dv + vision.depth * per_block + attention)
            + merged * (2 * wide * wide + 2 * wide * vision.out_hidden_size))


def program_flops(model_config, shapes: Shapes, program: str) -> float:
    t, v = model_config.text, model_config.vision
    s = shapes
    if program == "sft_step":
        rows = s.sft_rows * s.sft_micro_batches
        tokens = rows * s.length
        forward = (text_flops(t, tokens, (s.length + 1) / 2) + head_flops(t, tokens)
                   + vision_flops(v, s.patches * s.sft_micro_batches, s.image_patches))
        return 3 * forward
    rows, sequence = s.prompts * s.samples, s.length + s.response
    if program in ("rft_logprobs", "rft_grad"):
        forward = (text_flops(t, rows * sequence, (sequence + 1) / 2) + head_flops(t, rows * s.response)
                   + vision_flops(v, s.patches, s.image_patches))
        return forward if program == "rft_logprobs" else 3 * forward
    if program == "rollout_prefill":
        return (text_flops(t, s.prompts * s.length, (s.length + 1) / 2) + head_flops(t, s.prompts)
                + vision_flops(v, s.patches, s.image_patches))
    if program == "rollout_decode":
        tokens = rows * s.response
        return text_flops(t, tokens, s.length + s.response / 2) + head_flops(t, tokens)
    return 0.0  # rft_apply: element-wise optimizer arithmetic


# --- abstract inputs ---------------------------------------------------------------------------------------------

def _sds(shape, dtype):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _placed(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (a prefix tree of NamedShardings)."""
    import jax

    def attach(sharding, sub):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), sub)

    return jax.tree.map(attach, shardings, tree)


def _bytes_per_device(tree) -> int:
    import jax
    import numpy as np

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree) if hasattr(x, "sharding") and x.dtype != jax.dtypes.float0
               and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def _vision(model_config, patches: int, leading: tuple[int, ...] = ()):
    import jax.numpy as jnp

    from cpt_jax.models.qwen2_5_vl import VisionInputs

    if not patches:
        return None
    n = (*leading, patches)
    return VisionInputs(pixel_values=_sds((*n, model_config.vision.patch_dim), jnp.float32),
                        patch_order=_sds(n, jnp.int32), hw_N2=_sds((*n, 2), jnp.int32),
                        window_seg=_sds(n, jnp.int32), frame_seg=_sds(n, jnp.int32),
                        unpermute=_sds((*leading, patches // model_config.vision.merge_unit), jnp.int32))


def _prompts(model_config, rows: int, length: int, patches: int, leading: tuple[int, ...] = ()):
    import jax.numpy as jnp

    return {"input_ids": _sds((*leading, rows, length), jnp.int32),
            "attention_mask": _sds((*leading, rows, length), jnp.int32),
            "position_ids": _sds((*leading, 3, rows, length), jnp.int32),
            "vision": _vision(model_config, patches, leading)}


# --- the run -----------------------------------------------------------------------------------------------------

PROGRAMS = ("sft_step", "rft_logprobs", "rft_grad", "rft_apply", "rollout_prefill", "rollout_decode")


def default_programs(config) -> tuple[str, ...]:
    return ("sft_step",) if config.method in ("sft", "multitask_sft") else PROGRAMS[1:]


def topology_devices(topology: str):
    """The devices of a TPU topology such as 'v5p:2x2x2' (libtpu, no TPU needed), and the chip's name, HBM GiB per
    device and peak bf16 TFLOP/s per device."""
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as error:  # libtpu raises its own status errors
        raise ValueError(f"cannot describe TPU topology {topology!r} ({error}); names look like v4:2x2x1, v5e:2x2, "
                         "v5p:2x2x2, v6e:4x4, and libtpu must be installed (pip install -e '.[tpu]')") from None
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise ValueError(f"unknown TPU chip {kind!r}; known: {sorted(CHIPS)}")
    name, hbm, peak = CHIPS[kind]
    per_chip = len(devices) / len({tuple(d.coords) for d in devices})
    return devices, name, hbm / per_chip, peak / per_chip


def compile_programs(config, mesh, programs=None, *, on_report=None) -> list[Report]:
    """Lowers and compiles `programs` (default: those of the config's method) of the real model on `mesh`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cpt_jax import sharding
    from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL
    from cpt_jax.models.qwen2_5_vl.published import resolve_config
    from cpt_jax.rl import sampling
    from cpt_jax.train.optimizer import make_optimizer
    from cpt_jax.train.rft import RFTConfig, RFTLearner
    from cpt_jax.train.sft import make_sft_step
    from cpt_jax.train.state import TrainState, cast_floating

    programs = tuple(programs or default_programs(config))
    model_config = resolve_config(config.model.hf_dir, config.model.name)
    shapes = shapes_of(config)
    layout = sharding.Layout(mesh)
    dtype, param_dtype = jnp.dtype(config.model.dtype), jnp.dtype(config.model.param_dtype)
    abstract_model = nnx.eval_shape(lambda: Qwen2_5_VL(model_config, rngs=nnx.Rngs(0), dtype=dtype,
                                                       param_dtype=param_dtype, attention=config.model.attention,
                                                       remat=config.model.remat))
    graphdef, params = nnx.split(abstract_model, nnx.Param)
    optimizer = make_optimizer({**config.optim.to_dict(), "total_steps": 1})

    def init(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.tx.init(p),
                          rng=jax.random.key(0))

    abstract_state = jax.eval_shape(init, params)
    state = _placed(abstract_state, layout.shardings("params", abstract_state))
    params = state.params
    compute_params = jax.eval_shape(functools.partial(cast_floating, dtype=dtype), params)
    reference = (_placed(compute_params, layout.shardings("params", compute_params))
                 if config.rft.use_kl and config.rft.reference else None)
    sampler_params = _placed(compute_params, layout.shardings("params", compute_params, sampler=True))
    opt_bytes = _bytes_per_device(state.opt_state)
    ref_bytes = _bytes_per_device(reference) if reference is not None else 0

    s = shapes
    rows = s.prompts * s.samples
    rft = RFTConfig.from_config({k: v for k, v in config.rft.to_dict().items()
                                 if k in {f.name for f in dataclasses.fields(RFTConfig)}})
    learner = RFTLearner(graphdef, rft, layout=layout)
    update_batch = dict(_prompts(model_config, s.prompts, s.length, s.patches),
                        response=_sds((rows, s.response), jnp.int32),
                        response_mask=_sds((rows, s.response), jnp.int32),
                        advantages=_sds((rows,), jnp.float32), row_weight=_sds((rows,), jnp.float32),
                        old_logprobs=_sds((rows, s.response), jnp.float32))
    if rft.use_kl:
        update_batch["ref_logprobs"] = _sds((rows, s.response), jnp.float32)
    update_batch = _placed(update_batch, layout.shardings("batch", update_batch))
    # Gradients summed over the micro-batches of an update stay in HBM between them.
    accumulator = _bytes_per_device(params) if config.rft.micro_batches_per_update > 1 else 0

    def lower(name):
        if name == "sft_step":
            micro = (s.sft_micro_batches,) if s.sft_micro_batches > 1 else ()
            batch = dict(_prompts(model_config, s.sft_rows, s.length, s.patches, micro),
                         loss_mask=_sds((*micro, s.sft_rows, s.length), jnp.int32))
            batch = _placed(batch, layout.shardings("batch", batch))
            step = make_sft_step(graphdef, optimizer, compute_dtype=dtype, layout=layout)
            return step, (state, batch), {}, 0
        if name == "rft_logprobs":
            return learner.logprobs, (params, update_batch), {}, opt_bytes + ref_bytes
        if name == "rft_grad":
            return learner.grad, (params, update_batch), {}, opt_bytes + ref_bytes + accumulator
        if name == "rft_apply":
            scalar = _placed(_sds((), jnp.float32), layout.shardings("replicated", _sds((), jnp.float32)))
            return learner._apply_fn(optimizer), (state, params, scalar, scalar), {}, ref_bytes
        resident = _bytes_per_device(state) + ref_bytes
        prefill, decode = sampling.programs(layout)
        prompts = _prompts(model_config, s.prompts, s.length, s.patches)
        prompts = _placed(prompts, layout.shardings("batch", prompts, sampler=True))
        static = dict(cache_size=s.length + s.response - 1, num_samples=s.samples)
        if name == "rollout_prefill":
            return prefill, (graphdef, sampler_params, prompts), static, resident
        logits, cache = prefill.lower(graphdef, sampler_params, prompts, **static).out_info
        logits, cache = _placed((logits, cache), layout.tree_shardings(("batch", "batch"), (logits, cache),
                                                                       sampler=True))
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = _placed(key, layout.shardings("replicated", key, sampler=True))
        cfg = sampling.decode_config(model_config, max_new_tokens=s.response, temperature=rft.temperature,
                                     top_p=rft.top_p, top_k=rft.top_k, num_samples=s.samples,
                                     eos_token_ids=(model_config.text.eos_token_id,), pad_token_id=0)
        return decode, (graphdef, sampler_params, logits, cache, key), {"cfg": cfg}, resident

    reports = []
    for name in programs:
        if name not in PROGRAMS:
            raise ValueError(f"unknown program {name!r}; choose from {PROGRAMS}")
        start = time.perf_counter()
        program, args, static, resident = lower(name)
        lowered = program.lower(*args, **static)
        flops = program_flops(model_config, shapes, name)
        try:
            memory = lowered.compile().memory_analysis()
        except jax.errors.JaxRuntimeError as error:
            # The TPU compiler stops when temporaries exceed HBM and says how much they needed.
            needed = _exhausted_bytes(str(error))
            if needed is None:
                raise
            report = Report(name, _bytes_per_device(args), 0, 0, needed, resident, flops,
                            time.perf_counter() - start)
        else:
            report = Report(name, memory.argument_size_in_bytes, memory.output_size_in_bytes,
                            memory.alias_size_in_bytes, memory.temp_size_in_bytes, resident, flops,
                            time.perf_counter() - start)
        reports.append(report)
        if on_report is not None:
            on_report(report)
    return reports


def _exhausted_bytes(message: str) -> int | None:
    """Bytes of temporaries a program needed, from the TPU compiler's out-of-memory message (None if it is not)."""
    found = re.search(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)\)", message)
    if "RESOURCE_EXHAUSTED" not in message or found is None:
        return None
    return int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2) or " "))


def format_report(report: Report, hbm_gib: float, peak_tflops: float, devices: int) -> str:
    fits = "fits" if report.total <= hbm_gib * GiB else "DOES NOT FIT"
    flops = (f"{report.flops / 1e12:10.1f} TFLOP  >= {report.flops / (devices * peak_tflops * 1e12) * 1e3:9.1f} ms"
             if report.flops else f"{'-':>10}        {'-':>12}")
    return (f"{report.program:16s} arg {report.argument / GiB:7.2f}  out {report.output / GiB:7.2f}  "
            f"temp {report.temp / GiB:7.2f}  alias {report.alias / GiB:6.2f}  resident {report.resident / GiB:6.2f}  "
            f"total {report.total / GiB:7.2f} / {hbm_gib:5.1f} GiB {fits:12s} {flops}  compile "
            f"{report.compile_s:6.1f} s")


def register(subparsers):
    parser = subparsers.add_parser("aot", help="compile a config for a TPU slice on this host; check memory",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a config file, e.g. configs/qwen2_5_vl_7b_rft.py")
    parser.add_argument("--topology", help="TPU topology, e.g. v5p:2x2x2 (default: the config's aot_topology)")
    parser.add_argument("--programs", nargs="+", choices=PROGRAMS,
                        help="programs to compile (default: those of the config's method)")
    parser.set_defaults(func=_main)


def _main(args) -> int:
    import jax

    from cpt_jax.train.cli import load_config

    config = load_config(args.config, args.overrides)
    topology = args.topology or config.aot_topology
    if not topology:
        raise SystemExit("error: pass --topology (e.g. v5p:2x2x2) or set aot_topology in the config")
    if jax.default_backend() == "tpu":
        raise SystemExit("error: run with JAX_PLATFORMS=cpu; on a TPU host the local TPU would be initialised")
    try:
        devices, chip, hbm, peak = topology_devices(topology)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    from cpt_jax import sharding

    mesh = sharding.mesh_from_config(config.mesh, devices)
    print(f"{args.config} on {topology}: {len(devices)} {chip} devices, {hbm:.1f} GiB HBM each; mesh "
          f"{dict(mesh.shape)}; per-device memory, model FLOPs of the padded shapes and a lower bound on time at "
          "peak", flush=True)
    reports = compile_programs(config, mesh, args.programs,
                               on_report=lambda r: print(format_report(r, hbm, peak, len(devices)), flush=True))
    over = [r.program for r in reports if r.total > hbm * GiB]
    if over:
        print(f"does not fit on {topology}: {', '.join(over)}")
        return 1
    return 0

