"""Config parsing (flat hub and nested v5 layouts), validation errors, and real-size abstract builds."""

import copy

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig
from tests.models.qwen2_5_vl import reference as ref

# The published Qwen2.5-VL-3B-Instruct config.json (flat hub layout, legacy rope_scaling, tied embeddings).
HUB_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}


def _hub(size: str) -> dict:
    cfg = copy.deepcopy(HUB_3B)
    if size == "7b":
        cfg.update(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, max_window_layers=28)
        cfg["vision_config"]["out_hidden_size"] = 3584
    elif size == "72b":
        cfg.update(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                   num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, max_window_layers=80)
        cfg["vision_config"].update(out_hidden_size=8192, intermediate_size=3456)
    return cfg


@pytest.mark.parametrize("size", ["3b", "7b", "72b"])
def test_hub_configs_parse_like_transformers(size):
    raw = _hub(size)
    ours = Qwen2_5_VLConfig.from_hf(raw)
    theirs = transformers.Qwen2_5_VLConfig(**copy.deepcopy(raw))
    t, v = theirs.text_config, theirs.vision_config
    assert ours.text.hidden_size == t.hidden_size and ours.text.num_hidden_layers == t.num_hidden_layers
    assert ours.text.num_key_value_heads == t.num_key_value_heads and ours.text.vocab_size == t.vocab_size
    assert ours.text.mrope_section == tuple(t.rope_parameters["mrope_section"])
    assert ours.text.rope_theta == t.rope_parameters["rope_theta"] and ours.text.rms_norm_eps == t.rms_norm_eps
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    assert (ours.vision.depth, ours.vision.hidden_size, ours.vision.intermediate_size) == (
        v.depth, v.hidden_size, v.intermediate_size)
    assert ours.vision.fullatt_block_indexes == tuple(v.fullatt_block_indexes)
    assert ours.vision.tokens_per_second == 2 and ours.image_token_id == theirs.image_token_id


def test_nested_v5_layout_round_trips_through_transformers(tmp_path):
    config = ref.tiny_config()
    hf = transformers.Qwen2_5_VLConfig(**config.to_hf())
    hf.save_pretrained(tmp_path)
    assert Qwen2_5_VLConfig.from_hf(tmp_path) == config
    assert Qwen2_5_VLConfig.from_hf(tmp_path / "config.json") == config


def test_tied_embeddings_in_text_config_are_forwarded_to_the_root():
    raw = ref.tiny_config().to_hf()
    raw["text_config"]["tie_word_embeddings"] = True
    assert Qwen2_5_VLConfig.from_hf(raw).tie_word_embeddings


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["rope_scaling"].update(mrope_section=[16, 24, 16]), "mrope_section"),
    (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda c: c.update(use_sliding_window=True), "use_sliding_window"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(frobnicate=1), "frobnicate"),
    (lambda c: c["vision_config"].update(out_hidden_size=1024), "out_hidden_size"),
    (lambda c: c["vision_config"].update(fullatt_block_indexes=[40]), "fullatt_block_indexes"),
    (lambda c: c["vision_config"].update(mystery=2), "mystery"),
    (lambda c: c.pop("hidden_size"), "hidden_size"),
    (lambda c: c.update(image_token_id=10**6), "image_token_id"),
    (lambda c: c["rope_scaling"].update(type="yarn"), "rope_type"),
])
def test_bad_fields_are_errors_naming_them(edit, field):
    raw = _hub("3b")
    edit(raw)
    with pytest.raises(ValueError, match=field):
        Qwen2_5_VLConfig.from_hf(raw)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen2_5_VLConfig.from_hf(tmp_path)


@pytest.mark.parametrize("size, expected", [("3b", 3.755e9), ("7b", 8.292e9), ("72b", 73.411e9)])
def test_published_sizes_build_abstractly_with_the_right_parameter_count(size, expected):
    config = Qwen2_5_VLConfig.from_hf(_hub(size))
    abstract = nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert abs(count - expected) / expected < 1e-3, count
