"""Test setup: JAX on CPU with 8 fake host devices, fixed seeds.

The environment variables must be set before jax is imported anywhere, so they live at the top of the
root conftest, which pytest imports before any test module.
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# Parity tests compare against fp32 torch; keep JAX matmuls in full fp32 precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SEED = 0


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(SEED)
    np.random.seed(SEED)
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.manual_seed(SEED)
    yield
