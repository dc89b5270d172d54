"""cpt-jax: continual post-training of Qwen2.5-VL with SFT and RFT in JAX/Flax NNX."""

from setuptools import find_packages, setup

# Lower bounds are the versions the test suite was run with (see README "Tested versions").
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "transformers>=5.23.0",
    "tokenizers>=0.23",
    # transformers' chat templates need it but do not declare it.
    "jinja2>=3.1",
    "safetensors>=0.8.0",
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2.18",
    "array_record>=0.8.6",
    "pyarrow>=26.0",
    "ml_collections>=1.1.0",
    "numpy>=2.4",
    "pillow>=13.0",
    "mathruler>=0.1.0",
    # mathruler imports these without declaring them.
    "pylatexenc>=2.11",
    "sympy>=1.14",
    "tensorboardX>=2.6.5",
    "matplotlib>=3.11",
    "tqdm>=4.70",
]

setup(
    name="cpt_jax",
    version="0.1.0",
    description=(
        "JAX/Flax reimplementation of 'Reinforcement Fine-Tuning Naturally Mitigates Forgetting in "
        "Continual Post-Training' (arXiv 2507.05386) for Qwen2.5-VL"
    ),
    packages=find_packages(include=["cpt_jax", "cpt_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "tpu": ["jax[tpu]>=0.10.2"],
        "cuda": ["jax[cuda12]>=0.10.2"],
        # torch is used only by the parity tests (transformers is the numerical reference).
        "test": ["pytest>=9.0", "pytest-xdist>=3.8", "torch==2.13.0"],
    },
    entry_points={"console_scripts": ["cpt-jax=cpt_jax.cli:main"]},
)
