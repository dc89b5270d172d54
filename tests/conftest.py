"""Test setup: JAX on CPU with 8 fake host devices, fixed seeds.

The environment variables must be set before jax is imported anywhere, so they live at the top of the
root conftest, which pytest imports before any test module.
"""

import atexit
import os
import shutil
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# Parity tests compare against fp32 torch; keep JAX matmuls in full fp32 precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Many tests build the same tiny programs in fresh closures (one per run or model); a per-session persistent
# compilation cache turns the repeats into cache hits. It is removed at exit (subprocess tests share it, and end
# before the session does).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cpt_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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
