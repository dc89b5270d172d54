"""Hugging Face checkpoint I/O: `config.json` + safetensors (single file or sharded with an index). Never unpickles.

One table maps every parameter of `Qwen2_5_VL` to its transformers tensor name and layout; loading and saving are
the two directions of the same table. Loading onto a mesh reads, for each device, only the slice of each tensor that
device holds (safetensors slices), so a host materialises its own devices' shards, never the whole model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from cpt_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from cpt_jax.models.qwen2_5_vl.model import Qwen2_5_VL
from cpt_jax.models.qwen2_5_vl.sharding import PARAM_RULES, Rules, logical_to_mesh_sharding

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: tuple[str, ...]  # nnx state path
    name: str  # v5 tensor name; "{i}" is the layer index for stacked parameters
    kind: str  # "linear": torch (out, in) weight of a kernel whose first n_in axes are inputs; "copy"; "patch"
    n_in: int = 1

    @property
    def stacked(self) -> bool:
        return "{i}" in self.name


def _table(config: Qwen2_5_VLConfig) -> list[_Entry]:
    v, lm = "model.visual", "model.language_model"
    e = [_Entry(("visual", "patch_embed"), f"{v}.patch_embed.proj.weight", "patch")]
    blk = ("visual", "blocks")
    for norm in ("norm1", "norm2"):
        e.append(_Entry((*blk, norm, "scale"), f"{v}.blocks.{{i}}.{norm}.weight", "copy"))
    e += [_Entry((*blk, "attn", "qkv", "kernel"), f"{v}.blocks.{{i}}.attn.qkv.weight", "linear"),
          _Entry((*blk, "attn", "qkv", "bias"), f"{v}.blocks.{{i}}.attn.qkv.bias", "copy"),
          _Entry((*blk, "attn", "proj", "kernel"), f"{v}.blocks.{{i}}.attn.proj.weight", "linear", 2),
          _Entry((*blk, "attn", "proj", "bias"), f"{v}.blocks.{{i}}.attn.proj.bias", "copy")]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        e += [_Entry((*blk, "mlp", proj, "kernel"), f"{v}.blocks.{{i}}.mlp.{proj}.weight", "linear"),
              _Entry((*blk, "mlp", proj, "bias"), f"{v}.blocks.{{i}}.mlp.{proj}.bias", "copy")]
    e.append(_Entry(("visual", "merger", "ln_q", "scale"), f"{v}.merger.ln_q.weight", "copy"))
    for ours, theirs in (("mlp0", "mlp.0"), ("mlp2", "mlp.2")):
        e += [_Entry(("visual", "merger", ours, "kernel"), f"{v}.merger.{theirs}.weight", "linear"),
              _Entry(("visual", "merger", ours, "bias"), f"{v}.merger.{theirs}.bias", "copy")]
    e.append(_Entry(("language_model", "embed_tokens"), f"{lm}.embed_tokens.weight", "copy"))
    lay = ("language_model", "layers")
    for norm in ("input_layernorm", "post_attention_layernorm"):
        e.append(_Entry((*lay, norm, "scale"), f"{lm}.layers.{{i}}.{norm}.weight", "copy"))
    for proj in ("q_proj", "k_proj", "v_proj"):
        e += [_Entry((*lay, "self_attn", proj, "kernel"), f"{lm}.layers.{{i}}.self_attn.{proj}.weight", "linear"),
              _Entry((*lay, "self_attn", proj, "bias"), f"{lm}.layers.{{i}}.self_attn.{proj}.bias", "copy")]
    e.append(_Entry((*lay, "self_attn", "o_proj", "kernel"), f"{lm}.layers.{{i}}.self_attn.o_proj.weight", "linear", 2))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        e.append(_Entry((*lay, "mlp", proj, "kernel"), f"{lm}.layers.{{i}}.mlp.{proj}.weight", "linear"))
    e.append(_Entry(("language_model", "norm", "scale"), f"{lm}.norm.weight", "copy"))
    if not config.tie_word_embeddings:
        e.append(_Entry(("lm_head",), "lm_head.weight", "linear"))
    return e


def _num_layers(config: Qwen2_5_VLConfig, entry: _Entry) -> int:
    return config.vision.depth if entry.path[0] == "visual" else config.text.num_hidden_layers


def _names(config, entry: _Entry) -> list[str]:
    if not entry.stacked:
        return [entry.name]
    return [entry.name.format(i=i) for i in range(_num_layers(config, entry))]


def _groups(entry: _Entry, hf_ndim: int, ndim: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """How a stored tensor's axes hold ours: (stored axes, our axes) pairs in stored order; each pair's stored axes
    are the row-major flattening of its our axes (in that order)."""
    if entry.kind == "linear":
        return [((0,), tuple(range(entry.n_in, ndim))), ((1,), tuple(range(entry.n_in)))]
    if entry.kind == "patch":
        return [((0,), (1,)), (tuple(range(1, hf_ndim)), (0,))]
    if hf_ndim == ndim:
        return [((i,), (i,)) for i in range(ndim)]
    return [(tuple(range(hf_ndim)), tuple(range(ndim)))]


def _read_block(tensor, entry: _Entry, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """ours[index] of one (per-layer) parameter of `shape`, reading only the stored rows/columns it needs.

    A group read exactly is split at most along its first axis (then its stored range is contiguous); other groups
    are read whole and sliced here (only the vision qkv heads, a few MB per layer).
    """
    index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
    groups = _groups(entry, len(tensor.get_shape()), len(shape))
    stored, sizes, after = [], [], [slice(None)] * len(shape)
    for stored_axes, axes in groups:
        first = index[axes[0]]
        rest_full = all(index[a] == slice(0, shape[a]) for a in axes[1:])
        if len(stored_axes) == 1 and rest_full:
            inner = math.prod(shape[a] for a in axes[1:])
            stored.append(slice(first.start * inner, first.stop * inner))
            sizes += [first.stop - first.start] + [shape[a] for a in axes[1:]]
        else:
            stored += [slice(None)] * len(stored_axes)
            sizes += [shape[a] for a in axes]
            for a in axes:
                after[a] = index[a]
    order = [a for _, axes in groups for a in axes]
    block = np.asarray(tensor[tuple(stored)]).reshape(sizes).transpose(np.argsort(order))
    return block[tuple(after)]


def _to_hf(w: np.ndarray, entry: _Entry, config: Qwen2_5_VLConfig) -> np.ndarray:
    if entry.kind == "linear":
        n_in = math.prod(w.shape[:entry.n_in])
        return w.reshape(n_in, -1).T
    if entry.kind == "patch":
        vc = config.vision
        return w.T.reshape(vc.hidden_size, vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size)
    if entry.path[-1] == "bias":
        return w.reshape(-1)
    return w


def _v5_name(name: str) -> str:
    """Legacy hub names (`visual.*`, `model.layers.*`) to v5 names, as transformers' conversion mapping does."""
    if name.startswith("visual."):
        return "model." + name
    if re.match(r"^model\.(?!(language_model|visual)\.)", name):
        return "model.language_model." + name[len("model."):]
    return name


def _legacy_name(name: str) -> str:
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


class _TensorIndex:
    """Tensor name -> (file, stored name) over one or several safetensors files, read lazily."""

    def __init__(self, ckpt_dir: str):
        index_path = os.path.join(ckpt_dir, INDEX_FILE)
        single = os.path.join(ckpt_dir, SINGLE_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = {name: os.path.join(ckpt_dir, fname) for name, fname in weight_map.items()}
        elif os.path.isfile(single):
            with safe_open(single, "numpy") as f:
                files = {name: single for name in f.keys()}
        else:
            found = sorted(p for p in os.listdir(ckpt_dir) if p.endswith((".bin", ".pt", ".pth", ".safetensors")))
            raise FileNotFoundError(f"{ckpt_dir!r} has neither {SINGLE_FILE} nor {INDEX_FILE} (found {found}); "
                                    "cpt-jax reads safetensors only — convert pickled checkpoints with transformers")
        self.files: dict[str, tuple[str, str]] = {}
        for stored, path in files.items():
            name = _v5_name(stored)
            if name in self.files:
                raise ValueError(f"tensor {name!r} appears twice in {ckpt_dir!r} (as {self.files[name][1]!r} "
                                 f"and {stored!r})")
            self.files[name] = (path, stored)
        self._open: dict[str, object] = {}

    def slice(self, name: str):
        """A lazily read view of one tensor (`get_shape()`, numpy-style slicing)."""
        path, stored = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(path, "numpy")
        return self._open[path].get_slice(stored)

    def read(self, name: str) -> np.ndarray:
        return self.slice(name)[...]

    def close(self):
        self._open.clear()


def load_hf_checkpoint(ckpt_dir: str | os.PathLike, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
                       compute_dtype=None, attention: str = "xla", remat: str = "none",
                       rules: Mapping[str, Rules] = PARAM_RULES) -> Qwen2_5_VL:
    """Builds `Qwen2_5_VL` from a transformers checkpoint directory.

    `dtype` is the parameter dtype (compute dtype defaults to it). Missing, unexpected or mis-shaped tensors are
    errors naming them. With `mesh`, each parameter is created on its sharding from the per-tower logical axis
    `rules` (e.g. `sharding.SAMPLER_RULES`), each device's shard read straight from the files; on several
    processes every process makes the same call.
    """
    ckpt_dir = os.fspath(ckpt_dir)
    config = Qwen2_5_VLConfig.from_hf(ckpt_dir)
    abstract = nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0), dtype=compute_dtype or dtype,
                                                 param_dtype=dtype, attention=attention, remat=remat))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    index = _TensorIndex(ckpt_dir)
    table = _table(config)
    expected = {name for entry in table for name in _names(config, entry)}
    tied_head = config.tie_word_embeddings and "lm_head.weight" in index.files
    unexpected = sorted(set(index.files) - expected - ({"lm_head.weight"} if tied_head else set()))
    missing = sorted(expected - set(index.files))
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt_dir!r} does not match its config: missing {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
    try:
        for entry in table:
            var = flat[entry.path]
            shape = var.get_value().shape
            per_layer = shape[1:] if entry.stacked else shape
            tensors = [index.slice(name) for name in _names(config, entry)]
            hf_shape = _to_hf(np.empty(per_layer, np.uint8), entry, config).shape
            for name, tensor in zip(_names(config, entry), tensors):
                if tuple(tensor.get_shape()) != hf_shape:
                    raise ValueError(f"tensor {name!r} has shape {tuple(tensor.get_shape())}, expected {hf_shape} "
                                     "for this config")

            def read(where, entry=entry, per_layer=per_layer, tensors=tensors):
                if not entry.stacked:
                    return _read_block(tensors[0], entry, per_layer, where).astype(np.dtype(dtype))
                layers = range(*where[0].indices(len(tensors)))
                block = tuple(len(range(*s.indices(n))) for s, n in zip(where[1:], per_layer))
                out = np.empty((len(layers),) + block, np.dtype(dtype))
                for j, i in enumerate(layers):
                    out[j] = _read_block(tensors[i], entry, per_layer, where[1:])
                return out

            if mesh is None:
                value = jnp.asarray(read((slice(None),) * len(shape)))
            else:
                sharding = logical_to_mesh_sharding(var, mesh, rules, entry.path)
                value = jax.make_array_from_callback(shape, sharding, _once_per_index(read))
            var.set_value(value)
        if tied_head and not _same_tensor(index.slice("lm_head.weight"),
                                          index.slice("model.language_model.embed_tokens.weight")):
            raise ValueError(f"{ckpt_dir!r}: tie_word_embeddings is true but lm_head.weight differs from "
                             "embed_tokens.weight; fix tie_word_embeddings in config.json")
    finally:
        index.close()
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _same_tensor(a, b, rows: int = 4096) -> bool:
    """Whether two stored tensors are equal, compared a block of rows at a time (never a whole embedding in memory
    twice)."""
    shape = tuple(a.get_shape())
    if shape != tuple(b.get_shape()):
        return False
    return all(np.array_equal(a[i:i + rows], b[i:i + rows]) for i in range(0, shape[0], rows))


def _once_per_index(read):
    """`read` called once per distinct index: devices holding replicas of a shard share one host copy."""
    blocks = {}

    def cached(where):
        key = tuple((s.start, s.stop) for s in where)
        if key not in blocks:
            blocks[key] = read(where)
        return blocks[key]

    return cached


def iter_hf_tensors(model: Qwen2_5_VL) -> Iterator[tuple[str, np.ndarray]]:
    """(legacy hub name, torch-layout numpy array) for every parameter, one tensor at a time."""
    config = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for entry in _table(config):
        value = flat[entry.path].get_value()
        for i, name in enumerate(_names(config, entry)):
            w = np.asarray(jax.device_get(value[i] if entry.stacked else value))
            yield _legacy_name(name), np.ascontiguousarray(_to_hf(w, entry, config))


def save_hf_checkpoint(model: Qwen2_5_VL, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 1024**3,
                       dtype=None) -> str:
    """Writes `config.json` and safetensors (sharded with an index above `max_shard_bytes`) loadable by transformers.

    Tensors use the hub's names (`visual.*`, `model.layers.*`), which every transformers version reads.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    config_dict = model.config.to_hf()
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for name, w in iter_hf_tensors(model):
        if dtype is not None:
            w = w.astype(np.dtype(dtype))
        if sizes[-1] and sizes[-1] + w.nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = w
        sizes[-1] += w.nbytes
    config_dict["torch_dtype"] = str(next(iter(shards[0].values())).dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SINGLE_FILE), metadata=metadata)
        return out_dir
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata=metadata)
        weight_map.update({name: fname for name in shard})
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
    return out_dir
