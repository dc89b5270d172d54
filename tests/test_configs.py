"""Every shipped config loads, declares only known keys, and starts with the command that runs it."""

import pathlib

import pytest

from cpt_jax.train.cli import load_config
from cpt_jax.train.config import METHODS

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.py"))


def test_there_is_a_config_per_method():
    names = {p.stem for p in CONFIGS}
    assert {f"qwen2_5_vl_7b_{m}" for m in METHODS} <= names and "demo" in names
    assert {"qwen2_5_vl_3b_sft", "qwen2_5_vl_3b_rft"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_documents_its_command(path):
    config = load_config(str(path))
    assert config.method in METHODS
    assert path.read_text().splitlines()[0].startswith("# cpt-jax ")
    assert len(config.schedule.epochs) in (0, len(config.data.tasks))


def test_overrides_are_typed_and_unknown_keys_are_errors():
    path = str(pathlib.Path(__file__).parents[1] / "configs" / "qwen2_5_vl_7b_rft.py")
    config = load_config(path, ["rft.kl_coef=0", "data.tasks=['a','b']", "model.hf_dir=/x"])
    assert config.rft.kl_coef == 0.0 and isinstance(config.rft.kl_coef, float)
    assert config.data.tasks == ("a", "b") and config.model.hf_dir == "/x"
    with pytest.raises(KeyError, match="kl_coeff"):
        load_config(path, ["rft.kl_coeff=0"])


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.startswith("qwen2_5_vl_")], ids=lambda p: p.stem)
def test_paper_configs_keep_the_paper_batch_sizes_and_name_a_slice(path):
    config = load_config(str(path))
    assert config.aot_topology
    if config.method.endswith("sft"):
        assert config.sft.batch_size == 16
    else:
        prompts = config.rft.prompt_batch_size
        assert prompts * config.rft.rollout_batches == 512  # rollout batch (prompts)
        assert prompts * config.rft.micro_batches_per_update == 128  # update batch (prompts)
        assert config.rft.num_samples == 8 and config.rft.max_new_tokens == 1024
    assert config.data.max_pixels == 1003520
