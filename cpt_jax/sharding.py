"""Meshes, every sharding decision of a run, the jit signature of every program, and multi-host setup.

Mesh axes: 'data' (replicas; across slices it spans the data-center network), 'fsdp' (data parallel with parameters,
gradients and optimizer state sharded), 'tensor' (heads, MLP and vocabulary split within a layer). Parameters carry
logical axis names and the model's tables (`models/qwen2_5_vl/sharding.py`) map them to these axes.

`Layout` holds the decisions: the training mesh and rules, the sampler's (by default the same devices with parameters
whole along 'fsdp'), and the batch axes of every input field (`BATCH_FIELDS`). `PROGRAMS` declares, for each jitted
program of training and sampling, which kind of sharding each argument and output takes and which arguments are
donated; `jit(fn, program, layout)` builds the program from that declaration.

Multi-host is plain multi-controller JAX: every process runs the same program on its own shard of the data
(`global_batch` assembles the global arrays), and only process 0 writes logs and reports (`is_main_process`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cpt_jax.models.qwen2_5_vl.sharding import (ACTIVATION_RULES, PARAM_RULES, SAMPLER_RULES, Rules,
                                                activation_rules, partition_spec, rules_for)

MESH_AXES = ("data", "fsdp", "tensor")

__all__ = ["MESH_AXES", "BATCH_FIELDS", "PROGRAMS", "Layout", "Program", "activation_rules", "global_batch",
           "init_model", "is_main_process", "jit", "local_batch", "make_mesh", "maybe_initialize_distributed",
           "reshard"]


# --- meshes ----------------------------------------------------------------------------------------------------

def _fill(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
    """`sizes` with one -1 replaced so that their product is `total`."""
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} for {what}: give positive sizes and at most one "
                         "-1 (which takes the remaining devices)")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if total % known:
            raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} for {what}: {total} devices are not "
                             f"divisible by {known}; choose sizes whose product divides {total}")
        sizes = [total // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != total:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} for {what} use {math.prod(sizes)} devices, but "
                         f"there are {total}; set one size to -1 to take the rest")
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *, dcn_data: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes).

    `data`, `fsdp` and `tensor` are sizes within one slice (ICI); one of them may be -1 to take the remaining
    devices. `dcn_data` > 1 spreads 'data' over that many slices (TPU multi-slice; GPU hosts count as slices), so
    the 'data' axis has `data * dcn_data` entries and only gradient reductions cross the slow network. Devices are
    ordered along the physical torus (`mesh_utils`), so the inner axes ('tensor', then 'fsdp') get the nearest chips.
    """
    devices = list(jax.devices() if devices is None else devices)
    if dcn_data < 1 or len(devices) % dcn_data:
        raise ValueError(f"dcn_data={dcn_data} must be a positive divisor of the {len(devices)} devices")
    per_slice = _fill((data, fsdp, tensor), len(devices) // dcn_data, f"{len(devices) // dcn_data} devices per slice")
    if dcn_data == 1:
        grid = mesh_utils.create_device_mesh(per_slice, devices, allow_split_physical_axes=True)
    else:
        # TPU slices are the granules; without several slices (GPU hosts, CPU), each process is one.
        slices = {getattr(d, "slice_index", 0) for d in devices}
        grid = mesh_utils.create_hybrid_device_mesh(per_slice, (dcn_data, 1, 1), devices,
                                                    process_is_granule=len(slices) == 1,
                                                    allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(config, devices: Sequence[Any] | None = None) -> Mesh:
    """`make_mesh` from the `mesh` section of an experiment config (data, fsdp, tensor, dcn_data, num_devices).

    `num_devices` > 0 uses only the first that many devices (one process; e.g. a single-device run on a host that
    has several); 0 uses them all.
    """
    devices = list(jax.devices() if devices is None else devices)
    count = config.get("num_devices", 0)
    if count:
        if count < 0 or count > len(devices):
            raise ValueError(f"mesh.num_devices={count} must be 0 (all) or between 1 and the {len(devices)} devices")
        if jax.process_count() > 1:
            raise ValueError(f"mesh.num_devices={count} selects devices of one process; with "
                             f"{jax.process_count()} processes leave it at 0 (all devices)")
        devices = devices[:count]
    return make_mesh(config.data, config.fsdp, config.tensor, dcn_data=config.dcn_data, devices=devices)


# --- multi-host ------------------------------------------------------------------------------------------------

def maybe_initialize_distributed(switch: bool, **kwargs) -> None:
    """`jax.distributed.initialize(**kwargs)` when `switch` is on, before any other JAX call.

    On Cloud TPU VMs (and SLURM, Open MPI, Kubernetes) the coordinator, process count and index are detected; pass
    `coordinator_address`, `num_processes` and `process_id` elsewhere. Every process then sees all devices of the
    job in `jax.devices()` and runs the same program.
    """
    if switch and not jax.distributed.is_initialized():
        jax.distributed.initialize(**kwargs)


@contextlib.contextmanager
def compilation_cache(path: str | os.PathLike | None):
    """XLA's persistent compilation cache in `path` while the block runs (`None` or "": unchanged).

    Programs are keyed by their HLO, so runs that build the same steps again (the demo's four methods, a resumed
    run, the next launch) load them instead of compiling; every program is cached, however fast it compiled. The
    previous settings come back on exit.
    """
    if not path or jax.config.jax_compilation_cache_dir == os.fspath(path):
        yield
        return
    from jax.experimental.compilation_cache import compilation_cache as cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = {name: getattr(jax.config, name) for name in names}
    os.makedirs(path, exist_ok=True)
    for name, value in zip(names, (os.fspath(path), 0.0, 0)):
        jax.config.update(name, value)
    cache.reset_cache()  # the cache object is built once per process from the settings of its first use
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        cache.reset_cache()


def is_main_process() -> bool:
    """True on the one process (index 0) that writes logs, reports and checkpoint metadata."""
    return jax.process_index() == 0


# --- shardings -------------------------------------------------------------------------------------------------

# Logical axes of every named input and output field of the programs (rows: `act_batch`, image patches:
# `act_patches`). A leaf with one axis more than listed is a stack of micro-batches (leading axis unsplit); leaves
# without a field name (positional outputs such as logits) have their rows on the first axis.
BATCH_FIELDS: dict[str, tuple[str | None, ...]] = {
    # SFT and prompt batches (train/sft.py, data/pipeline.py)
    "input_ids": ("act_batch", "act_length"),
    "attention_mask": ("act_batch", "act_length"),
    "loss_mask": ("act_batch", "act_length"),
    "position_ids": (None, "act_batch", "act_length"),
    "valid": ("act_batch",),
    # vision inputs: the patches of all images of the batch, flattened (models/qwen2_5_vl/vision.py)
    "pixel_values": ("act_patches", None),
    "patch_order": ("act_patches",),
    "hw_N2": ("act_patches", None),
    "window_seg": ("act_patches",),
    "frame_seg": ("act_patches",),
    "unpermute": ("act_patches",),
    # RFT update inputs (train/rft.py)
    "response": ("act_batch", "act_length"),
    "response_mask": ("act_batch", "act_length"),
    "old_logprobs": ("act_batch", "act_length"),
    "ref_logprobs": ("act_batch", "act_length"),
    "sampler_logprobs": ("act_batch", "act_length"),
    "advantages": ("act_batch",),
    "row_weight": ("act_batch",),
    # rollouts: the KV cache and the samples (models/qwen2_5_vl/model.py, rl/sampling.py)
    "k": ("layers", "act_batch", "act_kv_length", "act_kv_heads", None),
    "v": ("layers", "act_batch", "act_kv_length", "act_kv_heads", None),
    "mask": ("act_batch", "act_kv_length"),
    "index": (),
    "positions": (None, "act_batch"),
    "rope_deltas": ("act_batch",),
    "tokens": ("act_batch", "act_length"),
    "logprobs": ("act_batch", "act_length"),
    "lengths": ("act_batch",),
}

# Index fields of `VisionInputs` point into the patch (or merged-token) axis of their own batch; in a global batch
# they are offset by where the process's block starts. Segment ids only need to stay distinct between processes.
_PATCH_INDEX_FIELDS = ("patch_order", "unpermute", "window_seg", "frame_seg")
# The axes a global batch concatenates over processes.
_PROCESS_SPLIT_AXES = ("act_batch", "act_patches")

KINDS = ("params", "batch", "replicated")


def _field_name(path) -> str | None:
    for key in reversed(path):
        if isinstance(key, jax.tree_util.DictKey) and isinstance(key.key, str):
            return key.key
        if isinstance(key, jax.tree_util.GetAttrKey):
            return key.name
    return None


def _batch_names(path, ndim: int) -> tuple[str | None, ...]:
    name = _field_name(path)
    if name is None:
        return ("act_batch",) + (None,) * (ndim - 1) if ndim else ()
    if name not in BATCH_FIELDS:
        raise KeyError(f"batch field {name!r} (at {jax.tree_util.keystr(path)}) has no declared axes; add it to "
                       "cpt_jax.sharding.BATCH_FIELDS")
    names = BATCH_FIELDS[name]
    if ndim == len(names) + 1:
        return (None,) + names
    if ndim != len(names):
        raise ValueError(f"batch field {name!r} has {ndim} axes, expected {len(names)} {names} or one more for "
                         "stacked micro-batches")
    return names


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


@dataclasses.dataclass(frozen=True)
class Program:
    """The jit signature of one program: a sharding kind per argument (a prefix tree of `KINDS`), the kinds of
    its outputs (a prefix of the output tree), the donated arguments, and whether it runs in the sampler layout."""

    args: tuple
    out: Any
    donate: tuple[int, ...] = ()
    sampler: bool = False


PROGRAMS: dict[str, Program] = {
    # (state, batch) -> (state, metrics)
    "sft_step": Program(args=("params", "batch"), out=("params", "replicated"), donate=(0,)),
    # (params, batch) -> log-probs (N, T)
    "rft_logprobs": Program(args=("params", "batch"), out="batch"),
    # (params, batch) -> ((loss sum, (count, metric sums)), gradient)
    "rft_grad": Program(args=("params", "batch"), out=("replicated", "params")),
    # (params, batch, row weights) -> gradient of the loss over the weighted rows
    "rft_row_grad": Program(args=("params", "batch", "batch"), out="params"),
    # (accumulator, micro-batch) -> accumulator; both (gradient, loss sum, count, metric sums)
    "rft_accumulate": Program(args=(("params", "replicated", "replicated", "replicated"),) * 2,
                              out=("params", "replicated", "replicated", "replicated"), donate=(0,)),
    # (state, gradient sum, loss sum, count) -> (state, metrics)
    "rft_apply": Program(args=("params", "params", "replicated", "replicated"), out=("params", "replicated"),
                         donate=(0,)),
    # (graphdef, params, prompts) -> (logits (R, V), cache)
    "rollout_prefill": Program(args=("replicated", "params", "batch"), out=("batch", "batch"), sampler=True),
    # (graphdef, params, logits, cache, rng) -> (samples, cache)
    "rollout_decode": Program(args=("replicated", "params", "batch", "batch", "replicated"), out=("batch", "batch"),
                              donate=(3,), sampler=True),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Where every array of a run lives: parameters, optimizer state, batches and activations.

    Training uses `mesh` with `param_rules`; rollouts use `sampler_mesh` (default `mesh`) with `sampler_rules`
    (default: no 'fsdp' split). Moving parameters between the two is an explicit `reshard`. `compiler_options`
    (XLA debug options, e.g. TPU scheduler flags) apply to every program compiled for this layout.
    """

    mesh: Mesh
    sampler_mesh: Mesh | None = None
    param_rules: Mapping[str, Rules] = dataclasses.field(default_factory=lambda: PARAM_RULES)
    sampler_rules: Mapping[str, Rules] = dataclasses.field(default_factory=lambda: SAMPLER_RULES)
    activation_rules: Rules = dataclasses.field(default_factory=lambda: ACTIVATION_RULES)
    compiler_options: Mapping[str, Any] | None = None

    def mesh_for(self, sampler: bool = False) -> Mesh:
        return (self.sampler_mesh or self.mesh) if sampler else self.mesh

    def shardings(self, kind: str, tree, *, sampler: bool = False):
        """NamedShardings for `tree` (arrays, ShapeDtypeStructs or nnx Variables), a prefix of it in place of every
        Variable. Kinds: 'params' (parameters by their logical axes, anything else in the tree — step counters,
        keys — replicated; also for gradients, optimizer and train states), 'batch' (`BATCH_FIELDS`), 'replicated'.
        """
        mesh = self.mesh_for(sampler)
        if kind == "params":
            tables = self.sampler_rules if sampler else self.param_rules

            def param(path, leaf):
                names = leaf.get_metadata().get("out_sharding") if _is_variable(leaf) else None
                if not names:
                    return NamedSharding(mesh, PartitionSpec())
                shape = leaf.get_value().shape
                return NamedSharding(mesh, partition_spec(names, shape, mesh, rules_for(path, tables)))

            return jax.tree_util.tree_map_with_path(param, tree, is_leaf=_is_variable)
        if kind == "batch":
            def batch(path, leaf):
                names = _batch_names(path, np.ndim(leaf))
                return NamedSharding(mesh, partition_spec(names, np.shape(leaf), mesh, self.activation_rules))

            return jax.tree_util.tree_map_with_path(batch, tree)
        if kind == "replicated":
            return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), tree, is_leaf=_is_variable)
        raise ValueError(f"unknown sharding kind {kind!r}; choose one of {KINDS}")

    def tree_shardings(self, kinds, tree, *, sampler: bool = False):
        """Shardings for `tree` given `kinds`, a prefix tree of kind names."""
        return jax.tree.map(lambda kind, sub: self.shardings(kind, sub, sampler=sampler), kinds, tree)

    def activations(self, sampler: bool = False):
        """The context in which programs of this layout are traced (`constrain` pins activations)."""
        return activation_rules(self.mesh_for(sampler), self.activation_rules)


# --- programs --------------------------------------------------------------------------------------------------

class _LayoutJit:
    """`fn` jitted with the shardings `program` declares, built once per argument structure, shapes and static
    keyword arguments (which are bound before jitting; every other argument is positional).

    Arguments get `in_shardings`; outputs are pinned by a sharding constraint on the returned tree (equivalent to
    `out_shardings`, without tracing `fn` once more to learn the output structure). Calls and `lower` run in the
    layout's activation context, so the traced program carries the activation constraints.
    """

    def __init__(self, fn: Callable, program: Program, layout: Layout):
        self.fn, self.program, self.layout = fn, program, layout
        self._jitted: dict = {}
        functools.update_wrapper(self, fn)

    def _get(self, args, static):
        leaves, treedef = jax.tree.flatten(args, is_leaf=_is_variable)
        shapes = tuple(np.shape(x.get_value() if _is_variable(x) else x) for x in leaves)
        key = (treedef, shapes, tuple(sorted(static.items())))
        if key not in self._jitted:
            program, sampler = self.program, self.program.sampler
            if len(args) != len(program.args):
                raise TypeError(f"{self.fn.__name__} takes {len(program.args)} positional arguments under its "
                                f"declared signature, got {len(args)}")
            in_shardings = tuple(self.layout.tree_shardings(kinds, arg, sampler=sampler)
                                 for kinds, arg in zip(program.args, args))

            def constrained(*args):
                out = self.fn(*args, **static)
                return jax.lax.with_sharding_constraint(
                    out, self.layout.tree_shardings(program.out, out, sampler=sampler))

            self._jitted[key] = jax.jit(constrained, in_shardings=in_shardings, donate_argnums=program.donate,
                                        compiler_options=self.layout.compiler_options)
        return self._jitted[key]

    def __call__(self, *args, **static):
        with self.layout.activations(self.program.sampler):
            return self._get(args, static)(*args)

    def lower(self, *args, **static):
        with self.layout.activations(self.program.sampler):
            return self._get(args, static).lower(*args)


def jit(fn: Callable, program: str, layout: Layout | None = None, *, static_argnames: Sequence[str] = ()):
    """`fn` jitted with the signature `PROGRAMS[program]` declares: in/out shardings from `layout` and donation.

    Without a layout, jit decides placement (single device) and only donation applies. `static_argnames` are
    keyword-only arguments that select the program (e.g. a cache size) rather than feed it.
    """
    if program not in PROGRAMS:
        raise KeyError(f"unknown program {program!r}; declare it in cpt_jax.sharding.PROGRAMS")
    spec = PROGRAMS[program]
    if layout is None:
        return jax.jit(fn, donate_argnums=spec.donate, static_argnames=tuple(static_argnames))
    return _LayoutJit(fn, spec, layout)


# --- placing arrays --------------------------------------------------------------------------------------------

def init_model(make_model: Callable[[], nnx.Module], layout: Layout, *, sampler: bool = False) -> nnx.Module:
    """Builds `make_model()` directly on its shardings: shapes first, then a jitted init whose outputs are sharded,
    so no device ever holds the whole model. `make_model` must create its own `nnx.Rngs`."""
    abstract = nnx.eval_shape(make_model)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = layout.shardings("params", abstract_state, sampler=sampler)
    state = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=shardings,
                    compiler_options=layout.compiler_options)()
    return nnx.merge(graphdef, state)


def reshard(tree, shardings, *, donate: bool = False):
    """`tree` moved to `shardings` (a tree of NamedShardings, e.g. `layout.shardings('params', p, sampler=True)`),
    device to device and across processes. Host arrays must hold the same values on every process. With `donate`,
    the source buffers are freed."""
    return jax.device_put(tree, shardings, donate=donate)


def global_batch(local_batch, layout: Layout, *, sampler: bool = False):
    """Global arrays from each process's share of the batch (`jax.make_array_from_process_local_data`).

    Every process passes its own rows (the same shapes on all processes: pad to common buckets first, e.g.
    `Loader.align`); rows are split over ('data', 'fsdp') by `BATCH_FIELDS`. Index fields of vision inputs are
    offset to point into this process's block of the global patch axis.
    """
    processes = jax.process_count()

    def global_shape(path, x):
        # Shardings are chosen for the global rows and patches (a split that divides the global axis).
        names = _batch_names(path, np.ndim(x))
        shape = tuple(n * processes if name in _PROCESS_SPLIT_AXES else n for name, n in zip(names, np.shape(x)))
        return jax.ShapeDtypeStruct(shape, np.asarray(x).dtype)

    shardings = layout.shardings("batch", jax.tree_util.tree_map_with_path(global_shape, local_batch),
                                 sampler=sampler)

    def make(path, x, sharding):
        x = np.asarray(x)
        array = jax.make_array_from_process_local_data(sharding, x)
        name = _field_name(path)
        if jax.process_count() == 1:
            return array
        if x.ndim and array.shape == x.shape:
            # Unsplit, every process's rows would be taken for the same global rows.
            raise ValueError(f"batch field {name!r} of shape {x.shape} per process is not split over the "
                             f"{jax.process_count()} processes on mesh {dict(sharding.mesh.shape)}; give each "
                             "process a multiple of its ('data', 'fsdp') devices rows (and 4x that many patches)")
        if name not in _PATCH_INDEX_FIELDS:
            return array
        axis = x.ndim - 1
        start = min(shard.index[axis].start or 0 for shard in array.addressable_shards)
        x = np.where(x >= 0, x + start, x) if name.endswith("_seg") else x + start
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(make, local_batch, shardings)


def local_batch(global_tree):
    """This process's rows of global arrays as numpy (the inverse of `global_batch` for row-split fields)."""

    def local(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.global_array_to_host_local_array(x, x.sharding.mesh, x.sharding.spec))

    return jax.tree.map(local, global_tree)
