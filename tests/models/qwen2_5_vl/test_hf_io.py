"""HF checkpoint I/O: load (single/sharded, legacy/v5 names, onto a mesh), save -> transformers, errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import load_file, save_file

from cpt_jax.models.qwen2_5_vl import hf_io, load_hf_checkpoint, save_hf_checkpoint
from cpt_jax.models.qwen2_5_vl.hf_io import INDEX_FILE, SINGLE_FILE
from tests.models.qwen2_5_vl import reference as ref


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    grids = [(1, 8, 12)]
    ids = np.array([ref.prompt(rng, [4, grids[0], 9])])
    return dict(ids=ids, pixel_values=ref.pixels(rng, grids), image_grid_thw=np.array(grids))


def _ours(model, case):
    return np.asarray(model(case["ids"], pixel_values=case["pixel_values"], image_grid_thw=case["image_grid_thw"]))


def _params(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_save_then_transformers_from_pretrained_gives_the_same_logits(model, case, tmp_path):
    save_hf_checkpoint(model, tmp_path)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    theirs = ref.hf_forward(hf, case["ids"], None, case["pixel_values"], case["image_grid_thw"])
    assert np.abs(_ours(model, case) - theirs).max() <= 1e-5


def test_sharded_checkpoint_loads_in_both_libraries(model, case, tmp_path):
    save_hf_checkpoint(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (tmp_path / SINGLE_FILE).exists()
    reloaded = load_hf_checkpoint(tmp_path)
    for path, value in _params(model).items():
        np.testing.assert_array_equal(_params(reloaded)[path], value, err_msg=str(path))
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    theirs = ref.hf_forward(hf, case["ids"], None, case["pixel_values"], case["image_grid_thw"])
    assert np.abs(_ours(model, case) - theirs).max() <= 1e-5


def test_v5_and_legacy_tensor_names_load_identically(model, tmp_path):
    save_hf_checkpoint(model, tmp_path / "legacy")
    tensors = load_file(tmp_path / "legacy" / SINGLE_FILE)
    assert any(k.startswith("visual.") for k in tensors) and any(k.startswith("model.layers.") for k in tensors)
    v5 = {("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)
           if k.startswith("model.") else k): v for k, v in tensors.items()}
    os.makedirs(tmp_path / "v5")
    save_file(v5, tmp_path / "v5" / SINGLE_FILE)
    (tmp_path / "v5" / "config.json").write_text((tmp_path / "legacy" / "config.json").read_text())
    a, b = _params(load_hf_checkpoint(tmp_path / "legacy")), _params(load_hf_checkpoint(tmp_path / "v5"))
    for path in a:
        np.testing.assert_array_equal(a[path], b[path])


def _corrupt(src, dst, edit):
    tensors = load_file(src / SINGLE_FILE)
    edit(tensors)
    os.makedirs(dst)
    save_file(tensors, dst / SINGLE_FILE)
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing.*model.language_model.layers.1.mlp.up_proj"),
    (lambda t: t.update(extra=np.zeros(3, np.float32)), "unexpected.*extra"),
    (lambda t: t.update({"visual.blocks.0.attn.qkv.bias": np.zeros(95, np.float32)}),
     "visual.blocks.0.attn.qkv.bias.*shape"),
])
def test_bad_tensors_are_errors_naming_them(hf_dir, tmp_path, edit, match):
    bad = _corrupt(hf_dir, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=match):
        load_hf_checkpoint(bad)


def test_pickled_checkpoints_are_refused(hf_dir, tmp_path):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        load_hf_checkpoint(tmp_path)


def test_bf16_parameters_round_trip(model, tmp_path):
    save_hf_checkpoint(model, tmp_path, dtype=jnp.bfloat16)
    loaded = load_hf_checkpoint(tmp_path, dtype=jnp.bfloat16)
    q = loaded.language_model.layers.self_attn.q_proj.kernel.get_value()
    assert q.dtype == jnp.bfloat16
    ref_q = model.language_model.layers.self_attn.q_proj.kernel.get_value().astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(ref_q, np.float32))


def test_load_onto_a_mesh_shards_parameters_and_keeps_values(model, hf_dir):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
    sharded = load_hf_checkpoint(hf_dir, mesh=mesh)
    q = sharded.language_model.layers.self_attn.q_proj.kernel.get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32, 1, 16)  # (layers, D/2, H/4, Dh)
    # 2 kv heads do not divide the 4-way tensor axis: that dimension is replicated, not silently mis-split.
    k = sharded.language_model.layers.self_attn.k_proj.kernel.get_value()
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    for path, value in _params(model).items():
        np.testing.assert_array_equal(_params(sharded)[path], value, err_msg=str(path))


def test_each_device_reads_only_its_slice_of_each_tensor(model, hf_dir):
    """`_read_block` of any slice equals that slice of the whole converted tensor, for every kind of table entry."""
    config = model.config
    index = hf_io._TensorIndex(str(hf_dir))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(0)
    try:
        for entry in hf_io._table(config):
            full = np.asarray(flat[entry.path].get_value())
            per_layer = full.shape[1:] if entry.stacked else full.shape
            name = hf_io._names(config, entry)[-1]
            whole = full[-1] if entry.stacked else full
            for _ in range(3):
                where = []
                for n in per_layer:
                    start = int(rng.integers(0, n))
                    where.append(slice(start, int(rng.integers(start + 1, n + 1))))
                block = hf_io._read_block(index.slice(name), entry, per_layer, tuple(where))
                np.testing.assert_array_equal(block, whole[tuple(where)], err_msg=f"{name} {where}")
    finally:
        index.close()


def test_load_onto_a_mesh_with_the_sampler_rules(model, hf_dir):
    from cpt_jax.models.qwen2_5_vl.sharding import SAMPLER_RULES

    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    sharded = load_hf_checkpoint(hf_dir, mesh=mesh, rules=SAMPLER_RULES)
    gate = sharded.language_model.layers.mlp.gate_proj.kernel.get_value()
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")  # 'fsdp' holds replicas
    qkv = sharded.visual.blocks.attn.qkv.kernel.get_value()  # (Ly, D, 3, H, Dh): heads split, not the leading 3
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "tensor", None)
    for path, value in _params(model).items():
        np.testing.assert_array_equal(_params(sharded)[path], value, err_msg=str(path))
