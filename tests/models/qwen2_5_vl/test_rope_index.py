"""M-RoPE position ids against transformers' `Qwen2_5_VLModel.get_rope_index` on a tiny config."""

import functools
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from cpt_jax.models.qwen2_5_vl.rope_index import get_rope_index

VISION_START, VISION_END, IMAGE, VIDEO, PAD = 58, 59, 60, 61, 0


@functools.lru_cache
def _hf_model(tokens_per_second=2):
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6},
        ),
        vision_config=dict(
            depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=16,
            spatial_merge_size=2, tokens_per_second=tokens_per_second,
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return Qwen2_5_VLModel(config)


def _row(*segments):
    """Token ids: an int is that many text tokens, ('image'|'video', (t, h, w)) a framed placeholder run."""
    ids = []
    for segment in segments:
        if isinstance(segment, int):
            ids += [3 + (len(ids) + i) % 50 for i in range(segment)]
        else:
            kind, (t, h, w) = segment
            ids += [VISION_START] + [IMAGE if kind == "image" else VIDEO] * (t * h * w // 4) + [VISION_END]
    return ids


def _left_pad(rows):
    length = max(map(len, rows))
    ids = np.array([[PAD] * (length - len(r)) + r for r in rows], np.int64)
    mask = np.array([[0] * (length - len(r)) + [1] * len(r) for r in rows], np.int64)
    return ids, mask


def _hf_rope_index(ids, mask, image_grid_thw, video_grid_thw=None, second_per_grid_ts=None, tokens_per_second=2):
    def tensor(x):
        return None if x is None else torch.as_tensor(np.asarray(x))

    ids = torch.as_tensor(ids)
    token_type = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    with torch.no_grad():
        position_ids, deltas = _hf_model(tokens_per_second).get_rope_index(
            ids, token_type, image_grid_thw=tensor(image_grid_thw), video_grid_thw=tensor(video_grid_thw),
            second_per_grid_ts=tensor(second_per_grid_ts), attention_mask=tensor(mask),
        )
    return position_ids.numpy(), deltas.numpy().reshape(-1)


def _assert_matches_hf(rows, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                       tokens_per_second=2):
    ids, mask = _left_pad(rows)
    config = _hf_model(tokens_per_second).config
    position_ids, deltas = get_rope_index(ids, image_grid_thw, mask, config, video_grid_thw, second_per_grid_ts)
    want_position_ids, want_deltas = _hf_rope_index(
        ids, mask, image_grid_thw, video_grid_thw, second_per_grid_ts, tokens_per_second
    )
    assert position_ids.dtype == np.int32 and position_ids.shape == (3, *ids.shape)
    assert deltas.dtype == np.int32 and deltas.shape == (ids.shape[0],)
    np.testing.assert_array_equal(position_ids, want_position_ids)
    np.testing.assert_array_equal(deltas, want_deltas)
    return position_ids, deltas


CASES = {
    "text_only": dict(rows=[_row(9), _row(5)]),
    "one_image": dict(rows=[_row(4, ("image", (1, 4, 6)), 5)], image_grid_thw=[[1, 4, 6]]),
    "two_images_of_different_grids": dict(
        rows=[_row(3, ("image", (1, 12, 20)), 2, ("image", (1, 8, 8)), 6)],
        image_grid_thw=[[1, 12, 20], [1, 8, 8]],
    ),
    "left_padded_batch_with_different_image_counts": dict(
        rows=[_row(2, ("image", (1, 6, 4)), 3), _row(3, ("image", (1, 4, 4)), 1, ("image", (1, 10, 2)), 8), _row(4)],
        image_grid_thw=[[1, 6, 4], [1, 4, 4], [1, 10, 2]],
    ),
    "video_then_text": dict(
        rows=[_row(2, ("video", (3, 8, 8)), 7)], video_grid_thw=[[3, 8, 8]], second_per_grid_ts=[1.0]
    ),
    "video_without_second_per_grid_ts": dict(rows=[_row(2, ("video", (4, 4, 6)), 3)], video_grid_thw=[[4, 4, 6]]),
    "images_and_videos_mixed": dict(
        rows=[
            _row(2, ("image", (1, 4, 8)), 1, ("video", (5, 4, 4)), 3),
            _row(1, ("video", (2, 6, 6)), 2, ("image", (1, 2, 2)), 2, ("video", (3, 2, 4)), 4),
        ],
        image_grid_thw=[[1, 4, 8], [1, 2, 2]],
        video_grid_thw=[[5, 4, 4], [2, 6, 6], [3, 2, 4]],
        second_per_grid_ts=np.array([0.5, 1.3, 0.7], np.float32),
    ),
    "integer_second_per_grid_ts": dict(
        rows=[_row(1, ("video", (3, 2, 4)), 2), _row(3, ("video", (2, 4, 2)), 1)],
        video_grid_thw=[[3, 2, 4], [2, 4, 2]],
        second_per_grid_ts=np.array([1, 3], np.int64),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_transformers(case):
    _assert_matches_hf(**case)


def test_text_only_rows_are_arange_with_zero_delta_and_zero_padding():
    position_ids, deltas = _assert_matches_hf([_row(9), _row(5)])
    np.testing.assert_array_equal(position_ids[:, 0], np.broadcast_to(np.arange(9), (3, 9)))
    np.testing.assert_array_equal(position_ids[:, 1], np.broadcast_to([0] * 4 + list(range(5)), (3, 9)))
    np.testing.assert_array_equal(deltas, [0, 0])


def test_two_images_hand_computed():
    # 11 text tokens, an image of 6x10 merged tokens, 2 text, an image of 4x4, 9 text: 98 tokens.
    ids = np.array([[5] * 11 + [IMAGE] * 60 + [5] * 2 + [IMAGE] * 16 + [5] * 9])
    position_ids, deltas = get_rope_index(ids, [[1, 12, 20], [1, 8, 8]], None, _hf_model().config)
    text_tail = list(range(27, 36))
    want_t = list(range(11)) + [11] * 60 + [21, 22] + [23] * 16 + text_tail
    want_h = list(range(11)) + list(np.repeat(np.arange(11, 17), 10)) + [21, 22] + list(
        np.repeat(np.arange(23, 27), 4)) + text_tail
    want_w = list(range(11)) + list(range(11, 21)) * 6 + [21, 22] + list(range(23, 27)) * 4 + text_tail
    np.testing.assert_array_equal(position_ids[:, 0], [want_t, want_h, want_w])
    np.testing.assert_array_equal(deltas, [35 + 1 - 98])


def test_text_after_a_long_video_resumes_after_the_spatial_extent():
    # Video grid (3, 8, 8) at position 3 with 2 tokens/s and 1 s per grid: frames at t = 3, 5, 7, spatial 3..6.
    ids = np.array([[5] * 3 + [VIDEO] * 48 + [5] * 2])
    position_ids, deltas = get_rope_index(ids, None, None, _hf_model().config, [[3, 8, 8]], [1.0])
    np.testing.assert_array_equal(position_ids[0, 0, 3:51], np.repeat([3, 5, 7], 16))
    np.testing.assert_array_equal(position_ids[1, 0, 3:51], np.tile(np.repeat(np.arange(3, 7), 4), 3))
    np.testing.assert_array_equal(position_ids[:, 0, 51:], [[7, 8]] * 3)
    np.testing.assert_array_equal(deltas, [8 + 1 - 53])


@pytest.mark.parametrize(
    "tokens_per_second, seconds, dtype, frame, want",
    [
        # 25 * 0.29 * 4 truncates to 29 in float32 and to 28 in float64.
        (25, 0.29, np.float32, 4, 29),
        (25, 0.29, np.float64, 4, 28),
        # The frame index times the interval is also a float32 product: 25 * float32(0.08) gives 2, not 1.
        (2, 0.04, np.float32, 25, 2),
    ],
)
def test_frame_interval_is_computed_in_the_dtype_of_second_per_grid_ts(tokens_per_second, seconds, dtype, frame,
                                                                       want):
    grid = [frame + 1, 2, 2]
    position_ids, _ = _assert_matches_hf(
        [_row(1, ("video", grid), 1)], video_grid_thw=[grid], second_per_grid_ts=np.array([seconds], dtype),
        tokens_per_second=tokens_per_second,
    )
    assert position_ids[0, 0, 2 + frame] - 2 == want


def test_random_layouts_match_transformers():
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows, images, videos, seconds = [], [], [], []
        for _ in range(rng.integers(1, 4)):
            segments = [int(rng.integers(1, 4))]
            for _ in range(rng.integers(0, 4)):
                kind = str(rng.choice(["image", "video"]))
                grid = (1 if kind == "image" else int(rng.integers(1, 5)), *(2 * rng.integers(1, 7, size=2)))
                (images if kind == "image" else videos).append(grid)
                if kind == "video":
                    seconds.append(rng.choice([0.5, 1.0, 1.5, 2.0 / 3]))
                segments += [(kind, grid), int(rng.integers(0, 4))]
            rows.append(_row(*segments))
        _assert_matches_hf(
            rows, images or None, videos or None, np.array(seconds, np.float32) if videos else None
        )


def test_accepts_jax_arrays_and_a_duck_typed_config():
    ids, mask = _left_pad([_row(3, ("image", (1, 4, 6)), 2), _row(1)])
    config = types.SimpleNamespace(
        image_token_id=IMAGE, video_token_id=VIDEO,
        vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=2),
    )
    got = get_rope_index(jnp.asarray(ids), jnp.asarray([[1, 4, 6]]), jnp.asarray(mask), config)
    want = get_rope_index(ids, np.array([[1, 4, 6]]), mask, _hf_model().config)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(
    "image_grid_thw, message",
    [
        ([[1, 4, 4]], "needs 4"),
        (None, "beyond the 0 rows of image_grid_thw"),
        ([[1, 4, 6], [1, 2, 2]], "placeholder runs for only 1 images"),
    ],
)
def test_mismatched_grids_are_rejected(image_grid_thw, message):
    ids = np.array([_row(2, ("image", (1, 4, 6)), 2)])
    with pytest.raises(ValueError, match=message):
        get_rope_index(ids, image_grid_thw, None, _hf_model().config)



def test_rejects_fractional_tokens_per_second():
    config = types.SimpleNamespace(
        image_token_id=IMAGE, video_token_id=VIDEO,
        vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=2.5),
    )
    with pytest.raises(ValueError, match="tokens_per_second must be a whole number"):
        get_rope_index(np.array([_row(3)]), None, None, config)
