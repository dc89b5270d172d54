import jax.numpy as jnp
import pytest

from cpt_jax.models.qwen2_5_vl import load_hf_checkpoint
from tests.models.qwen2_5_vl import reference


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A tiny transformers checkpoint with O(1) weights, saved as safetensors."""
    path = tmp_path_factory.mktemp("hf_tiny")
    reference.build_hf(reference.tiny_config(), seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_model(hf_dir):
    import torch
    import transformers

    return transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        hf_dir, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def model(hf_dir):
    return load_hf_checkpoint(hf_dir, dtype=jnp.float32)
