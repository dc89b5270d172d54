"""Ahead-of-time compilation: analytic FLOPs against XLA's count, and (with libtpu) compiling for a TPU topology."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpt_jax import aot, sharding
from cpt_jax.cli import main
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from cpt_jax.models.qwen2_5_vl.model import causal_mask
from cpt_jax.models.qwen2_5_vl.published import PUBLISHED, published_config, resolve_config
from cpt_jax.train.config import default_config
from tests import sharding_programs as programs

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def test_text_flops_match_xla_for_one_unscanned_layer():
    """With one layer the scan body runs once, so XLA's count is the model's; matmuls dominate at this width."""
    raw = programs.tiny_config().to_hf()
    raw["text_config"].update(hidden_size=512, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
                              num_key_value_heads=2)
    raw["text_config"]["rope_parameters"]["mrope_section"] = [8, 12, 12]
    raw["vision_config"]["out_hidden_size"] = 512
    config = Qwen2_5_VLConfig.from_hf(raw)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0))))
    batch, length = 2, 128

    def forward(state, x, positions, mask):
        return nnx.merge(graphdef, state).language_model(x, positions, causal_mask(mask))[0]

    args = (jax.ShapeDtypeStruct((batch, length, 512), jnp.float32),
            jax.ShapeDtypeStruct((3, batch, length), jnp.int32), jax.ShapeDtypeStruct((batch, length), jnp.int32))
    counted = jax.jit(forward).lower(state, *args).compile().cost_analysis()["flops"]
    analytic = aot.text_flops(config.text, batch * length, context=length)
    assert analytic == pytest.approx(counted, rel=0.02)


def test_program_flops_follow_the_shapes():
    config = published_config("Qwen/Qwen2.5-VL-7B-Instruct")
    shapes = aot.Shapes(sft_rows=8, sft_micro_batches=2, length=4096, patches=0, image_patches=5120, prompts=4,
                        samples=8, response=1024)
    sft = aot.program_flops(config, shapes, "sft_step")
    # ~6 N per token for N ~ 7.6e9 weights in the decoder and head (attention adds the rest).
    assert 6 * 7.0e9 * 16 * 4096 < sft < 6 * 9.0e9 * 16 * 4096
    assert aot.program_flops(config, shapes, "rft_grad") == pytest.approx(
        3 * aot.program_flops(config, shapes, "rft_logprobs"))
    assert aot.program_flops(config, shapes, "rft_apply") == 0.0


def test_out_of_memory_messages_give_the_bytes_needed():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(410.77G) exceeds available HBM (95.74G).")
    assert aot._exhausted_bytes(message) == int(410.77 * 1024**3)
    assert aot._exhausted_bytes("INVALID_ARGUMENT: something else") is None


def test_published_configs_and_resolution(tmp_path):
    assert published_config("Qwen/Qwen2.5-VL-3B-Instruct").tie_word_embeddings
    seven = published_config("Qwen/Qwen2.5-VL-7B-Instruct")
    assert (seven.text.hidden_size, seven.text.num_hidden_layers, seven.vision.out_hidden_size) == (3584, 28, 3584)
    (tmp_path / "config.json").write_text(json.dumps(programs.tiny_config().to_hf()))
    assert resolve_config(str(tmp_path), "Qwen/Qwen2.5-VL-7B-Instruct") == programs.tiny_config()
    assert resolve_config("", "Qwen/Qwen2.5-VL-7B-Instruct") == seven
    with pytest.raises(FileNotFoundError, match="set model.name to one of"):
        resolve_config(str(tmp_path / "missing"), "")
    with pytest.raises(KeyError, match="choose one of"):
        published_config("Qwen/Qwen2.5-VL-72B")
    assert set(PUBLISHED) == {"Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"}


def _tiny_config(hf_dir):
    c = default_config()
    c.model.hf_dir = str(hf_dir)
    c.model.remat = "full"
    c.data.length_buckets = (32,)
    c.data.patch_buckets = (64,)
    c.data.max_pixels = 16 * 14 * 14
    c.sft.batch_size, c.sft.micro_batches = 8, 2
    c.rft.prompt_batch_size, c.rft.num_samples, c.rft.max_new_tokens = 4, 2, 8
    c.rft.micro_batches_per_update = 2
    return c


@pytest.mark.tpu
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]')")
@pytest.mark.parametrize("remat", ["full", "none"])  # "none" differentiates through Linear's own VJP
def test_every_program_compiles_for_a_tpu_topology(tmp_path, remat):
    (tmp_path / "config.json").write_text(json.dumps(programs.tiny_config().to_hf()))
    devices, chip, hbm, _ = aot.topology_devices("v5e:2x2")
    assert (len(devices), chip, hbm) == (4, "v5e", 16)
    config = _tiny_config(tmp_path)
    config.model.remat = remat
    mesh = sharding.mesh_from_config(config.mesh, devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    reports = {r.program: r for r in aot.compile_programs(config, mesh, aot.PROGRAMS)}
    assert set(reports) == set(aot.PROGRAMS)
    for report in reports.values():
        assert 0 < report.total < hbm * aot.GiB and report.temp >= 0
    # The SFT step's arguments are the train state and a batch, split over fsdp=4 where dimensions allow (a replicated
    # state alone would be state_bytes per device).
    params = sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(
        nnx.eval_shape(lambda: Qwen2_5_VL(programs.tiny_config(), rngs=nnx.Rngs(0))), nnx.Param)))
    state_bytes = 3 * 4 * params  # fp32 parameters and two AdamW moments
    assert state_bytes / 4 < reports["sft_step"].argument < 0.7 * state_bytes
    assert reports["rft_grad"].resident > 0 and reports["rollout_decode"].flops > 0


@pytest.mark.tpu
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]')")
def test_cli_exits_non_zero_when_a_program_does_not_fit(tmp_path, capsys):
    path = tmp_path / "big.py"
    path.write_text("from cpt_jax.train.paper import paper_config\n\n\ndef get_config():\n"
                    "    return paper_config('sft', '3b')\n")
    assert main(["aot", "--config", str(path), "--topology", "v5e:2x2", "--programs", "sft_step"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "does not fit on v5e:2x2: sft_step" in out
