"""Meshes, layouts and sharded programs: every mesh gives the single-device numbers, with parameters really split;
two processes give the numbers of one.

Programs compile with XLA:CPU's cheapest settings (`programs.FAST`); the single-device reference is a one-device
layout compiled the same way.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from cpt_jax import sharding
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL
from cpt_jax.models.qwen2_5_vl.sharding import constrain, partition_spec
from cpt_jax.rl.sampling import generate
from cpt_jax.train.optimizer import path_str
from tests import sharding_programs as programs

FAST = programs.FAST
TOL = dict(rtol=1e-5, atol=1e-5)


def layout_of(data, fsdp, tensor, devices=None, **kwargs):
    return sharding.Layout(sharding.make_mesh(data, fsdp, tensor, devices=devices), compiler_options=FAST, **kwargs)


def flat(tree):
    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_spec(x, mesh, spec):
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (x.sharding, spec)


def assert_placed(layout, tree):
    """Every array of `tree` (a train state) has the sharding `layout` declares for it."""

    def check(declared, x):
        x = x.get_value() if isinstance(x, nnx.Variable) else x
        assert x.sharding.is_equivalent_to(declared, x.ndim), (x.sharding, declared)

    jax.tree.map(check, layout.shardings("params", tree), tree)


@pytest.fixture(scope="module")
def single_device():
    out = programs.run(layout_of(1, 1, 1, devices=jax.devices()[:1]))
    return dict(jax.device_get({k: v for k, v in out.items() if k not in ("images", "initial")}),
                summary=programs.summary(out))


# mesh (data, fsdp, tensor) -> expected specs of q_proj's kernel (Ly, D, H, Dh), k_proj's (Ly, D, K, Dh), and the
# rows of a batch. 2 KV heads do not divide a 4-way tensor axis, so they stay whole there.
MESHES = {
    (8, 1, 1): (P(None, None, None, None), P(None, None, None, None), P("data", None)),
    (1, 8, 1): (P(None, "fsdp", None, None), P(None, "fsdp", None, None), P("fsdp", None)),
    (1, 2, 4): (P(None, "fsdp", "tensor", None), P(None, "fsdp", None, None), P("fsdp", None)),
    (2, 2, 2): (P(None, "fsdp", "tensor", None), P(None, "fsdp", "tensor", None), P(("data", "fsdp"), None)),
}


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(MESHES), ids=lambda s: "x".join(map(str, s)))
def test_sharded_programs_equal_single_device(shape, single_device):
    layout = layout_of(*shape)
    out = programs.run(layout, rft_logprobs=single_device["rft_logprobs"])
    q_spec, k_spec, rows_spec = MESHES[shape]

    # Parameters, optimizer state and batches are where the layout says, and really split.
    for state in (out["initial"], out["sft_state"], out["rft_state"]):
        attention = state.params["language_model"]["layers"]["self_attn"]
        assert_spec(attention["q_proj"]["kernel"], layout.mesh, q_spec)
        assert_spec(attention["k_proj"]["kernel"], layout.mesh, k_spec)
        assert_placed(layout, state)
        momentum = state.opt_state[0].trace
        for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(momentum)):
            assert m.sharding == p.sharding
    if shape != (8, 1, 1):
        q = out["sft_state"].params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
        assert q.addressable_shards[0].data.size < q.size
    assert_spec(out["images"]["input_ids"], layout.mesh, rows_spec)
    assert_spec(out["images"]["vision"].pixel_values, layout.mesh, rows_spec)
    assert_spec(out["logits"], layout.mesh, P(rows_spec[0], None, "tensor" if shape[2] > 1 else None))
    assert all(x.is_deleted() for x in jax.tree.leaves(out["initial"].params)), "the SFT step donates its state"

    ref = single_device
    np.testing.assert_allclose(np.asarray(out["logits"]), ref["logits"], **TOL)
    for kind in ("sft", "rft"):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(float(out[kind][key]), float(ref[kind][key]), **TOL)
        # SGD with lr 1: parameters after the step are the initial ones minus the gradient.
        expected, actual = flat(ref[f"{kind}_state"].params), flat(out[f"{kind}_state"].params)
        for path, value in expected.items():
            np.testing.assert_allclose(actual[path], value, **TOL, err_msg=f"{kind} {path}")


def test_make_mesh_fills_sizes_and_names_bad_ones():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert dict(sharding.make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4]).shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="8 devices are not divisible by 3"):
        sharding.make_mesh(3, -1, 1)
    with pytest.raises(ValueError, match="use 4 devices, but there are 8"):
        sharding.make_mesh(2, 2, 1)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh(-1, -1, 1)
    with pytest.raises(ValueError, match="dcn_data=3 must be a positive divisor of the 8 devices"):
        sharding.make_mesh(dcn_data=3)


def test_partition_spec_keeps_the_mesh_axes_that_divide():
    mesh = sharding.make_mesh(2, 2, 2)
    rules = {"rows": ("data", "fsdp"), "heads": "tensor", "width": "fsdp"}
    assert partition_spec(("rows", None), (8, 3), mesh, rules) == P(("data", "fsdp"), None)
    assert partition_spec(("rows",), (2,), mesh, rules) == P("data")
    assert partition_spec(("rows",), (3,), mesh, rules) == P(None)
    assert partition_spec(("heads", "width"), (3, 4), mesh, rules) == P(None, "fsdp")
    # An axis already used by an earlier dimension is not used twice.
    assert partition_spec(("rows", "width"), (8, 4), mesh, rules) == P(("data", "fsdp"), None)
    with pytest.raises(KeyError, match="logical axis 'vocab' has no rule"):
        partition_spec(("vocab",), (8,), mesh, rules)


def test_batch_fields_are_declared_and_micro_batches_keep_their_axis_whole():
    layout = sharding.Layout(sharding.make_mesh(2, 2, 2))
    batch = {"input_ids": np.zeros((4, 6)), "position_ids": np.zeros((2, 3, 4, 6)), "index": np.zeros(())}
    specs = jax.tree.map(lambda s: s.spec, layout.shardings("batch", batch))
    assert specs == {"input_ids": P(("data", "fsdp"), None), "position_ids": P(None, None, ("data", "fsdp"), None),
                     "index": P()}
    assert layout.shardings("batch", (np.zeros((8, 5)),))[0].spec == P(("data", "fsdp"), None)  # positional: rows
    with pytest.raises(KeyError, match="batch field 'labels' .* add it to cpt_jax.sharding.BATCH_FIELDS"):
        layout.shardings("batch", {"labels": np.zeros((4,))})
    with pytest.raises(ValueError, match="'loss_mask' has 4 axes, expected 2"):
        layout.shardings("batch", {"loss_mask": np.zeros((1, 1, 4, 6))})


def test_constrain_is_a_no_op_without_activation_rules():
    x = jnp.ones((8, 4))
    assert constrain(x, ("act_batch", "act_embed")) is x
    mesh = sharding.make_mesh(2, 2, 2)
    f = jax.jit(lambda x: constrain(x * 2, ("act_batch", "act_vocab")))
    assert f(x).sharding.is_fully_replicated
    with sharding.activation_rules(mesh):
        y = f(x)  # retraced: the mesh context is part of jit's cache key
    assert y.sharding.spec == P(("data", "fsdp"), "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2.0)


def test_global_batch_places_rows_and_local_batch_returns_them():
    layout = sharding.Layout(sharding.make_mesh(1, 4, 2))
    local = programs.sft_batch()
    batch = sharding.global_batch(local, layout)
    assert batch["position_ids"].sharding.spec == P(None, "fsdp", None)
    assert batch["vision"].unpermute.sharding.spec == P("fsdp")
    back = sharding.local_batch(batch)
    for key in ("input_ids", "position_ids"):
        np.testing.assert_array_equal(back[key], local[key])
    np.testing.assert_array_equal(back["vision"].patch_order, local["vision"].patch_order)


def test_init_model_builds_parameters_on_their_shardings():
    def make():
        return Qwen2_5_VL(programs.tiny_config(), rngs=nnx.Rngs(3))

    layout = layout_of(1, 2, 4)
    model = sharding.init_model(make, layout)
    q = model.language_model.layers.self_attn.q_proj.kernel.get_value()
    assert_spec(q, layout.mesh, P(None, "fsdp", "tensor", None))
    assert q.addressable_shards[0].data.shape == (2, 32, 1, 16)
    single = sharding.init_model(make, layout_of(1, 1, 1, devices=jax.devices()[:1]))
    for (path, a), b in zip(flat(nnx.state(model)).items(), flat(nnx.state(single)).values()):
        np.testing.assert_array_equal(a, b, err_msg=path)


@pytest.mark.slow
def test_sampler_layout_is_an_explicit_reshard_and_samples_like_one_device():
    train = layout_of(1, 2, 4, sampler_mesh=sharding.make_mesh(2, 1, 4))
    graphdef, params = programs.tiny_params()
    values = sharding.reshard(jax.tree.map(jnp.asarray, params), train.shardings("params", params))
    assert_spec(values["language_model"]["layers"]["mlp"]["up_proj"]["kernel"], train.mesh, P(None, "fsdp", "tensor"))
    sampler_values = sharding.reshard(values, train.shardings("params", values, sampler=True))
    up = sampler_values["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert up.sharding.mesh == train.sampler_mesh
    assert_spec(up, train.sampler_mesh, P(None, None, "tensor"))
    assert not values["language_model"]["embed_tokens"].is_deleted(), "the training copy is kept"

    prompts, *_ = programs.rft_rollouts()
    kwargs = dict(max_new_tokens=4, temperature=1.0, num_samples=2, rng=jax.random.key(5), length_buckets=(8,))
    out = generate(nnx.merge(graphdef, sampler_values), prompts["input_ids"], prompts["attention_mask"],
                   layout=train, **kwargs)
    assert_spec(out.tokens, train.sampler_mesh, P("data", None))
    one = layout_of(1, 1, 1, devices=jax.devices()[:1])
    ref = generate(nnx.merge(graphdef, jax.tree.map(jnp.asarray, params)), prompts["input_ids"],
                   prompts["attention_mask"], layout=one, **kwargs)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), **TOL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(single_device):
    """2 CPU processes x 2 devices (gloo collectives), each feeding its own rows, give the single-device logits,
    losses and updated parameters (which every mesh of 4 and 8 devices above gives too)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH", "")])
    coordinator = f"localhost:{_free_port()}"
    workers = [subprocess.Popen([sys.executable, "-m", "tests.sharding_programs", "--process-id", str(i),
                                 "--num-processes", "2", "--coordinator", coordinator],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    reports = [[line[len(programs.SUMMARY):] for line in out.splitlines() if line.startswith(programs.SUMMARY)]
               for out, _ in outputs]
    assert len(reports[0]) == 1 and not reports[1], "only process 0 reports"
    two, one = json.loads(reports[0][0]), single_device["summary"]
    half = programs.SFT_ROWS // 2  # process 0 holds the first half of the rows
    np.testing.assert_allclose(np.array(two["logits"]), np.array(one["logits"])[:half], **TOL)
    for kind in ("sft", "rft"):
        for key, value in one[kind].items():
            assert two[kind][key] == pytest.approx(value, rel=1e-5, abs=1e-5), (kind, key)
        for path, value in one[f"{kind}_params"].items():
            np.testing.assert_allclose(two[f"{kind}_params"][path], value, **TOL, err_msg=f"{kind} {path}")


def test_compilation_cache_stores_programs_and_restores_the_settings(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    cache_dir = tmp_path / "jax_cache"
    with sharding.compilation_cache(cache_dir):
        assert jax.config.jax_compilation_cache_dir == str(cache_dir)
        # A program compiled nowhere else in the suite, so this compile writes an entry.
        jax.block_until_ready(jax.jit(lambda x: jnp.tanh(x) * 3.0 - x)(jnp.ones((3, 5, 7))))
        entries = list(cache_dir.iterdir())
        with sharding.compilation_cache(cache_dir):  # nested on the same directory: unchanged
            assert jax.config.jax_compilation_cache_dir == str(cache_dir)
    assert entries, "the compiled program was not written to the cache"
    assert jax.config.jax_compilation_cache_dir == before
    with sharding.compilation_cache(""):
        assert jax.config.jax_compilation_cache_dir == before
