"""cpt-jax: continual post-training of Qwen2.5-VL with SFT and RFT (GRPO-family) in JAX/Flax NNX."""

__version__ = "0.1.0"
