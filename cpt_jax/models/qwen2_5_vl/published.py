"""The `config.json` of the published Qwen2.5-VL Instruct checkpoints, so that shapes (ahead-of-time compilation,
memory planning) need no download. Flat hub layout, as on the Hugging Face hub."""

from __future__ import annotations

import copy
import os

from cpt_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig

_VISION = {
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
    "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
}

_COMMON = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 128000, "model_type": "qwen2_5_vl", "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}

PUBLISHED: dict[str, dict] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        **_COMMON, "hidden_size": 2048, "intermediate_size": 11008, "max_window_layers": 70,
        "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "vocab_size": 151936, "vision_config": {**_VISION, "out_hidden_size": 2048},
    },
    "Qwen/Qwen2.5-VL-7B-Instruct": {
        **_COMMON, "hidden_size": 3584, "intermediate_size": 18944, "max_window_layers": 28,
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
        "vocab_size": 152064, "vision_config": {**_VISION, "out_hidden_size": 3584},
    },
}


def published_config(name: str) -> Qwen2_5_VLConfig:
    """The configuration of a published checkpoint, by hub name (`PUBLISHED`)."""
    if name not in PUBLISHED:
        raise KeyError(f"no published configuration {name!r}; choose one of {sorted(PUBLISHED)}")
    return Qwen2_5_VLConfig.from_hf(copy.deepcopy(PUBLISHED[name]))


def resolve_config(hf_dir: str, name: str = "") -> Qwen2_5_VLConfig:
    """The model configuration from `hf_dir`'s config.json when it has one, else from the published `name`."""
    if hf_dir and os.path.isfile(os.path.join(hf_dir, "config.json")):
        return Qwen2_5_VLConfig.from_hf(hf_dir)
    if name:
        return published_config(name)
    raise FileNotFoundError(f"no config.json in model.hf_dir={hf_dir!r} and no model.name; set model.name to one of "
                            f"{sorted(PUBLISHED)} or model.hf_dir to a downloaded checkpoint")
