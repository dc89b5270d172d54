"""Speed of cpt-jax against transformers/PyTorch and against the machine's measured limits (see README, "Speed")."""
