"""Tiny Qwen2.5-VL reference models from transformers (torch CPU, fp32, eager attention) with O(1) weights."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from cpt_jax.models.qwen2_5_vl import Qwen2_5_VLConfig

IMAGE, VIDEO, VSTART, VEND, IM_START, IM_END = 505, 506, 503, 504, 501, 502
TEXT_VOCAB = 500  # ordinary text ids are drawn below the special ids


def tiny_config(tied: bool = False) -> Qwen2_5_VLConfig:
    """The reference tiny configuration (qwen2_5_vl.md §9): every structural feature, small sizes."""
    return Qwen2_5_VLConfig.from_hf({
        "model_type": "qwen2_5_vl",
        "image_token_id": IMAGE, "video_token_id": VIDEO,
        "vision_start_token_id": VSTART, "vision_end_token_id": VEND,
        "tie_word_embeddings": tied,
        "text_config": {
            "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            "bos_token_id": 500, "eos_token_id": IM_END,
        },
        "vision_config": {
            "depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48, "out_hidden_size": 64,
            "fullatt_block_indexes": [1], "window_size": 112, "tokens_per_second": 2,
        },
    })


def redraw_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """O(1)-scale weights: the default std-0.02 init gives logits ~1e-2, which hides numerical bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
    return model


def build_hf(config: Qwen2_5_VLConfig, seed: int = 0):
    hf_config = transformers.Qwen2_5_VLConfig(**config.to_hf())
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
        hf_config, attn_implementation="eager", dtype=torch.float32)
    return redraw_(model, seed).eval()


def prompt(rng: np.random.Generator, segments) -> list[int]:
    """Token ids from segments: an int n = n random text tokens, a tuple (t, h, w) = one image's placeholders."""
    ids = [IM_START]
    for seg in segments:
        if isinstance(seg, int):
            ids += rng.integers(0, TEXT_VOCAB, seg).tolist()
        else:
            t, h, w = seg
            ids += [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND]
    return ids + [IM_END]


def left_pad(rows: list[list[int]], pad_id: int = 0):
    length = max(map(len, rows))
    ids = np.full((len(rows), length), pad_id, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


def pixels(rng: np.random.Generator, grids) -> np.ndarray:
    n = sum(t * h * w for t, h, w in grids)
    return rng.standard_normal((n, 1176)).astype(np.float32)


def hf_forward(model, ids, mask=None, pixel_values=None, grid_thw=None):
    """transformers logits (numpy); mm_token_type_ids is required in 5.23 for 3D positions."""
    kwargs = dict(input_ids=torch.as_tensor(ids), mm_token_type_ids=torch.as_tensor((ids == IMAGE).astype(np.int64)))
    if mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(mask)
    if pixel_values is not None:
        kwargs["pixel_values"] = torch.as_tensor(pixel_values)
        kwargs["image_grid_thw"] = torch.as_tensor(np.asarray(grid_thw))
    with torch.no_grad():
        return model(**kwargs).logits.numpy()
