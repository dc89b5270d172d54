"""Qwen2.5-VL in Flax NNX, numerically matching transformers' `Qwen2_5_VLForConditionalGeneration`."""

from cpt_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig, VisionConfig
from cpt_jax.models.qwen2_5_vl.hf_io import load_hf_checkpoint, save_hf_checkpoint
from cpt_jax.models.qwen2_5_vl.model import KVCache, Qwen2_5_VL
from cpt_jax.models.qwen2_5_vl.rope_index import get_rope_index
from cpt_jax.models.qwen2_5_vl.vision import VisionInputs, vision_inputs

__all__ = ["Qwen2_5_VLConfig", "TextConfig", "VisionConfig", "Qwen2_5_VL", "KVCache", "load_hf_checkpoint",
           "save_hf_checkpoint", "get_rope_index", "VisionInputs", "vision_inputs"]
