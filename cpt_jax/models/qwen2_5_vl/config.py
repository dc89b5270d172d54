"""Qwen2.5-VL configuration: parsed from Hugging Face `config.json` (flat hub or nested v5 layout), validated.

The dataclasses are frozen and hashable so a config can live in an NNX graphdef and be a static jit argument.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

# Fields that describe how a checkpoint was saved or trained, not the network; accepted and dropped.
_INFORMATIONAL = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "model_type", "use_cache", "initializer_range",
    "_name_or_path", "name_or_path", "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "tokenizer_class", "is_encoder_decoder", "tf_legacy_loss", "pruned_heads",
    "torchscript", "_attn_implementation_autoset", "bos_token_id", "pad_token_id", "sep_token_id", "eos_token_id",
    "vision_token_id", "max_position_embeddings", "max_window_layers", "sliding_window",
})


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112
    tokens_per_second: float = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6  # hard-coded in transformers' vision tower

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple[int, ...] = (16, 24, 24)
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 128000
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    def __post_init__(self):
        _validate(self)

    # transformers-style aliases, so host-side helpers (get_rope_index) accept either config class.
    @property
    def vision_config(self) -> VisionConfig:
        return self.vision

    @property
    def text_config(self) -> TextConfig:
        return self.text

    @classmethod
    def from_hf(cls, dir_or_dict: str | os.PathLike | Mapping[str, Any]) -> "Qwen2_5_VLConfig":
        """Parses a transformers `config.json` (a directory, a file path, or the loaded dict).

        Accepts the flat hub layout (text fields at the root, legacy `rope_scaling`) and the nested v5 layout
        (`text_config`/`vision_config`, `rope_parameters`). Unknown or unsupported fields are errors naming them.
        """
        if isinstance(dir_or_dict, Mapping):
            raw, where = dict(dir_or_dict), "config dict"
        else:
            path = os.fspath(dir_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no Hugging Face config at {path!r}; pass a checkpoint directory with config.json")
            with open(path) as f:
                raw = json.load(f)
            where = path
        return _parse(raw, where)

    def to_hf(self) -> dict[str, Any]:
        """The nested v5 `config.json` dict that transformers' `Qwen2_5_VLConfig` reads back to this config."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": "qwen2_5_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "hidden_act": "silu",
                "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                    "mrope_section": list(t.mrope_section)},
                "use_sliding_window": False,
                "attention_dropout": 0.0,
                "bos_token_id": t.bos_token_id,
                "eos_token_id": list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id,
                "pad_token_id": t.pad_token_id,
            },
            "vision_config": {
                "model_type": "qwen2_5_vl_vision",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "num_heads": v.num_heads,
                "intermediate_size": v.intermediate_size,
                "out_hidden_size": v.out_hidden_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "in_channels": v.in_channels,
                "window_size": v.window_size,
                "tokens_per_second": v.tokens_per_second,
                "hidden_act": "silu",
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }


_TEXT_FIELDS = {f.name for f in dataclasses.fields(TextConfig)}
_VISION_FIELDS = {f.name for f in dataclasses.fields(VisionConfig)} - {"rms_norm_eps"}
_ROOT_FIELDS = {"image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings"}
_TEXT_CHECKED = {"hidden_act", "rope_scaling", "rope_parameters", "use_sliding_window", "attention_dropout", "layer_types",
                 "tie_word_embeddings", "head_dim"}
_VISION_ALIASES = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth", "in_chans": "in_channels"}


def _parse(raw: dict[str, Any], where: str) -> Qwen2_5_VLConfig:
    raw = dict(raw)
    if raw.get("model_type", "qwen2_5_vl") != "qwen2_5_vl":
        raise ValueError(f"{where}: model_type {raw['model_type']!r} is not 'qwen2_5_vl'")
    vision_raw = dict(raw.pop("vision_config", None) or {})
    text_raw = dict(raw.pop("text_config", None) or {})
    root = {k: raw.pop(k) for k in _ROOT_FIELDS if k in raw}
    # Flat hub layout: text fields at the root. A nested file may still carry root copies; the nested value wins.
    for key in list(raw):
        if key in _TEXT_FIELDS or key in _TEXT_CHECKED or key == "rope_theta":
            text_raw.setdefault(key, raw.pop(key))
    unknown = sorted(set(raw) - _INFORMATIONAL)
    if unknown:
        raise ValueError(f"{where}: unknown config field(s) {unknown}; cpt-jax implements Qwen2.5-VL without them")
    if "tie_word_embeddings" in text_raw:  # legacy placement, forwarded to the root like transformers does
        tied = text_raw.pop("tie_word_embeddings")
        root["tie_word_embeddings"] = bool(root.get("tie_word_embeddings", False) or tied)
    return Qwen2_5_VLConfig(text=_parse_text(text_raw, where), vision=_parse_vision(vision_raw, where), **root)


def _require(cond: bool, where: str, field: str, msg: str):
    if not cond:
        raise ValueError(f"{where}: field {field!r} {msg}")


def _parse_text(raw: dict[str, Any], where: str) -> TextConfig:
    where = f"{where} (text)"
    _require(raw.pop("hidden_act", "silu") == "silu", where, "hidden_act", "must be 'silu'")
    _require(not raw.pop("use_sliding_window", False), where, "use_sliding_window",
             "is true; sliding-window attention is not part of Qwen2.5-VL's released models and not implemented")
    _require(float(raw.pop("attention_dropout", 0.0) or 0.0) == 0.0, where, "attention_dropout", "must be 0")
    layer_types = raw.pop("layer_types", None)
    _require(layer_types is None or all(t == "full_attention" for t in layer_types), where, "layer_types",
             f"must all be 'full_attention', got {layer_types}")
    rope = raw.pop("rope_parameters", None) or raw.pop("rope_scaling", None) or {}
    raw.pop("rope_scaling", None)
    rope = dict(rope)
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    _require(rope_type in ("default", "mrope"), where, "rope_parameters.rope_type",
             f"is {rope_type!r}; only the default M-RoPE is supported")
    theta = rope.pop("rope_theta", raw.pop("rope_theta", 1_000_000.0))
    raw.pop("rope_theta", None)
    section = tuple(rope.pop("mrope_section", (16, 24, 24)))
    _require(not rope, where, "rope_parameters", f"has unsupported entries {sorted(rope)}")
    for key in ("model_type", *(k for k in list(raw) if k in _INFORMATIONAL and k not in _TEXT_FIELDS)):
        raw.pop(key, None)
    head_dim = raw.pop("head_dim", None)
    unknown = sorted(set(raw) - _TEXT_FIELDS)
    _require(not unknown, where, str(unknown), "is not a known Qwen2.5-VL text field")
    missing = sorted({"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"} - set(raw))
    _require(not missing, where, str(missing), "is missing (the class defaults are not a real checkpoint)")
    raw.setdefault("num_key_value_heads", raw["num_attention_heads"])
    if isinstance(raw.get("eos_token_id"), list):
        raw["eos_token_id"] = tuple(raw["eos_token_id"])
    cfg = TextConfig(mrope_section=section, rope_theta=float(theta), **raw)
    _require(head_dim is None or head_dim == cfg.head_dim, where, "head_dim",
             f"= {head_dim} differs from hidden_size/num_attention_heads = {cfg.head_dim}")
    return cfg


def _parse_vision(raw: dict[str, Any], where: str) -> VisionConfig:
    where = f"{where} (vision_config)"
    _require(raw.pop("hidden_act", "silu") == "silu", where, "hidden_act", "must be 'silu'")
    raw.pop("model_type", None)
    raw.pop("initializer_range", None)
    raw.pop("dtype", None)
    raw.pop("torch_dtype", None)
    spatial_patch = raw.pop("spatial_patch_size", None)
    for alias, name in _VISION_ALIASES.items():
        if alias in raw:
            value = raw.pop(alias)
            _require(raw.setdefault(name, value) == value, where, alias, f"disagrees with {name!r}")
    _require(spatial_patch is None or spatial_patch == raw.get("patch_size", 14), where, "spatial_patch_size",
             "differs from patch_size")
    rope = dict(raw.pop("rope_parameters", None) or {})
    _require(rope.pop("rope_type", "axial") == "axial", where, "rope_parameters.rope_type", "must be 'axial'")
    theta = float(rope.pop("rope_theta", 10000.0))
    _require(not rope, where, "rope_parameters", f"has unsupported entries {sorted(rope)}")
    for key in ("patch_size", "temporal_patch_size"):
        _require(isinstance(raw.get(key, 14), int), where, key, "must be a single int")
    unknown = sorted(set(raw) - _VISION_FIELDS)
    _require(not unknown, where, str(unknown), "is not a known Qwen2.5-VL vision field")
    missing = sorted({"depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size"} - set(raw))
    _require(not missing, where, str(missing), "is missing (the class defaults are not a real checkpoint)")
    raw["fullatt_block_indexes"] = tuple(raw.get("fullatt_block_indexes", (7, 15, 23, 31)))
    return VisionConfig(rope_theta=theta, **raw)


def _validate(cfg: Qwen2_5_VLConfig):
    t, v = cfg.text, cfg.vision
    where = "Qwen2_5_VLConfig"
    _require(t.hidden_size % t.num_attention_heads == 0, where, "text.num_attention_heads", "must divide hidden_size")
    _require(t.num_attention_heads % t.num_key_value_heads == 0, where, "text.num_key_value_heads",
             "must divide num_attention_heads")
    _require(len(t.mrope_section) == 3 and sum(t.mrope_section) == t.head_dim // 2, where, "text.mrope_section",
             f"= {list(t.mrope_section)} must have 3 entries summing to head_dim/2 = {t.head_dim // 2}")
    _require(t.head_dim % 2 == 0, where, "text.head_dim", "must be even")
    _require(v.hidden_size % v.num_heads == 0, where, "vision.num_heads", "must divide hidden_size")
    _require(v.head_dim % 4 == 0, where, "vision.head_dim", f"= {v.head_dim} must be a multiple of 4 (2D rotary)")
    _require(v.out_hidden_size == t.hidden_size, where, "vision.out_hidden_size",
             f"= {v.out_hidden_size} must equal text hidden_size {t.hidden_size}")
    _require(all(0 <= i < v.depth for i in v.fullatt_block_indexes), where, "vision.fullatt_block_indexes",
             f"= {list(v.fullatt_block_indexes)} must index blocks 0..{v.depth - 1}")
    unit = v.spatial_merge_size * v.patch_size
    _require(v.window_size % unit == 0, where, "vision.window_size",
             f"= {v.window_size} must be a multiple of spatial_merge_size*patch_size = {unit}")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        _require(0 <= getattr(cfg, name) < t.vocab_size, where, name,
                 f"= {getattr(cfg, name)} must be a token id below vocab_size {t.vocab_size}")
