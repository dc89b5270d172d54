"""Parity of the numpy Qwen2.5-VL processor with transformers' `Qwen2VLImageProcessorPil` (built locally)."""

import dataclasses
import json

import numpy as np
import PIL.Image
import pytest
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from cpt_jax.data.processor import ImageProcessor, smart_resize

HUB_MIN_PIXELS, HUB_MAX_PIXELS = 56 * 56, 28 * 28 * 16384
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# The published Qwen2.5-VL preprocessor_config.json.
HUB_CONFIG = {
    "min_pixels": HUB_MIN_PIXELS,
    "max_pixels": HUB_MAX_PIXELS,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}
SMALL_MAX_PIXELS = 28 * 28 * 64


def _hf(min_pixels=HUB_MIN_PIXELS, max_pixels=HUB_MAX_PIXELS):
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _rgba_with_alpha_range(height, width):
    rgba = _pixels((height, width, 4), seed=1)
    rgba[..., 3] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]  # fully transparent to opaque
    return rgba


def _assert_same_as_hf(processor, image, hf_processor, hf_image=None):
    pixel_values, grid_thw = processor.preprocess(image)
    expected = hf_processor(image if hf_image is None else hf_image)
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"][0])
    assert grid_thw.dtype == np.int64 and grid_thw.shape == (3,)
    assert pixel_values.dtype == np.float32 and pixel_values.shape == expected["pixel_values"].shape
    # Bit-identical: same PIL resize and the same float64-rescale / float32-normalise arithmetic.
    assert np.abs(pixel_values - expected["pixel_values"]).max() == 0.0
    return grid_thw


def test_smart_resize_hand_values():
    assert smart_resize(37, 61) == (56, 84)  # area below min_pixels: scaled up, sides ceiled
    assert smart_resize(70, 140) == (56, 140)  # 70 / 28 = 2.5 rounds half to even (2), not up (3)
    assert smart_resize(42, 140) == (56, 140)  # 1.5 rounds to 2
    assert smart_resize(1000, 2000, max_pixels=SMALL_MAX_PIXELS) == (140, 308)  # above max: floored
    assert smart_resize(10, 2000) == (28, 812)  # aspect ratio exactly 200 is allowed


def test_smart_resize_matches_transformers_on_random_sizes():
    rng = np.random.default_rng(0)
    sides = np.exp(rng.uniform(np.log(4), np.log(8000), size=(3000, 2))).astype(int)
    sides = sides[sides.max(1) / sides.min(1) <= 200]
    limits = [(HUB_MIN_PIXELS, HUB_MAX_PIXELS), (HUB_MIN_PIXELS, SMALL_MAX_PIXELS), (28 * 28 * 16, 28 * 28 * 256)]
    branches = {"min": 0, "max": 0}
    for min_pixels, max_pixels in limits:
        for height, width in sides.tolist():
            expected = hf_smart_resize(height, width, 28, min_pixels, max_pixels)
            assert smart_resize(height, width, 28, min_pixels, max_pixels) == expected, (height, width)
            rounded_area = round(height / 28) * round(width / 28) * 28 * 28
            branches["min"] += rounded_area < min_pixels
            branches["max"] += rounded_area > max_pixels
    assert branches["min"] > 100 and branches["max"] > 100  # both rescaling branches were exercised


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match=r"10x2010 .*aspect ratio 201.0 > 200; crop or pad"):
        smart_resize(10, 2010)
    with pytest.raises(ValueError, match="aspect ratio"):
        ImageProcessor().preprocess(_pixels((3000, 14, 3)))
    with pytest.raises(ValueError, match="must be positive"):
        smart_resize(0, 10)


@pytest.mark.parametrize(
    "shape, branch",
    [((37, 61, 3), "min"), ((100, 333, 3), "round"), ((250, 80, 3), "round"), ((56, 84, 3), "identity")],
)
def test_preprocess_matches_transformers(shape, branch):
    image = _pixels(shape)
    grid = _assert_same_as_hf(ImageProcessor(), image, _hf())
    height, width = shape[:2]
    rounded = (round(height / 28) * 28, round(width / 28) * 28)
    resized = (grid[1] * 14, grid[2] * 14)
    assert (rounded[0] * rounded[1] < HUB_MIN_PIXELS) == (branch == "min")
    assert (resized == (height, width)) == (branch == "identity")


def test_preprocess_max_pixels_matches_transformers():
    image = _pixels((300, 411, 3))
    assert round(300 / 28) * round(411 / 28) * 28 * 28 > SMALL_MAX_PIXELS
    processor = ImageProcessor(max_pixels=SMALL_MAX_PIXELS)
    grid = _assert_same_as_hf(processor, image, _hf(max_pixels=SMALL_MAX_PIXELS))
    assert grid[1] * grid[2] * 14 * 14 <= SMALL_MAX_PIXELS
    np.testing.assert_array_equal(grid, [1, 12, 18])  # beta = sqrt(300*411/50176): 6 x 9 merge blocks


def test_preprocess_pil_input_matches_transformers():
    _assert_same_as_hf(ImageProcessor(), PIL.Image.fromarray(_pixels((61, 37, 3))), _hf())


def test_grayscale_inputs_match_transformers():
    gray = _pixels((45, 70))
    # transformers rejects a bare (H, W) array; its (H, W, 1) and PIL "L" forms are the same image.
    _assert_same_as_hf(ImageProcessor(), gray, _hf(), hf_image=gray[..., None])
    _assert_same_as_hf(ImageProcessor(), PIL.Image.fromarray(gray), _hf())
    np.testing.assert_array_equal(
        ImageProcessor().preprocess(gray)[0], ImageProcessor().preprocess(np.repeat(gray[..., None], 3, -1))[0]
    )


def test_rgba_inputs_match_transformers():
    rgba = _rgba_with_alpha_range(50, 90)
    _assert_same_as_hf(ImageProcessor(), rgba, _hf())
    _assert_same_as_hf(ImageProcessor(), PIL.Image.fromarray(rgba), _hf())
    palette = PIL.Image.fromarray(_pixels((40, 64, 3))).convert("P")
    palette.info["transparency"] = 0
    _assert_same_as_hf(ImageProcessor(), palette, _hf())


def test_transparent_pixels_become_white():
    rgba = _pixels((56, 56, 4))
    rgba[..., 3] = 0
    pixel_values, _ = ImageProcessor().preprocess(rgba)
    white = (1.0 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    np.testing.assert_array_equal(pixel_values.reshape(16, 3, 392), np.broadcast_to(white[:, None], (16, 3, 392)))


def test_preprocess_images_concatenates_like_transformers():
    images = [_pixels((37, 61, 3), 1), _pixels((100, 333, 3), 2), _pixels((250, 80, 3), 3)]
    processor = ImageProcessor()
    pixel_values, grid_thw = processor.preprocess_images(images)
    expected = _hf()(images)
    np.testing.assert_array_equal(grid_thw, expected["image_grid_thw"])
    assert grid_thw.shape == (3, 3) and grid_thw.dtype == np.int64
    assert np.abs(pixel_values - expected["pixel_values"]).max() == 0.0
    np.testing.assert_array_equal(processor.num_image_tokens(grid_thw), [6, 48, 27])
    assert processor.num_image_tokens(grid_thw).sum() * 4 == len(pixel_values)


def test_preprocess_images_empty_and_error_names_image():
    pixel_values, grid_thw = ImageProcessor().preprocess_images([])
    assert pixel_values.shape == (0, 1176) and pixel_values.dtype == np.float32
    assert grid_thw.shape == (0, 3) and grid_thw.dtype == np.int64
    with pytest.raises(ValueError, match="image 1: .*aspect ratio"):
        ImageProcessor().preprocess_images([_pixels((56, 56, 3)), _pixels((5, 1200, 3))])


def test_num_image_tokens_and_patch_dim():
    processor = ImageProcessor()
    assert processor.patch_dim == 1176
    assert ImageProcessor(patch_size=16, temporal_patch_size=1).patch_dim == 768
    assert processor.num_image_tokens([1, 4, 6]) == 6
    assert processor.num_image_tokens(np.array([2, 8, 8])) == 32
    np.testing.assert_array_equal(processor.num_image_tokens([[1, 4, 6], [3, 2, 2]]), [6, 3])
    with pytest.raises(ValueError, match="grid_thw has shape"):
        processor.num_image_tokens([1, 4])


def test_rejects_unsupported_arrays():
    with pytest.raises(TypeError, match="dtype float32; pass uint8"):
        ImageProcessor().preprocess(np.zeros((56, 56, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(56, 56, 2\)"):
        ImageProcessor().preprocess(np.zeros((56, 56, 2), np.uint8))


def _normalised(frames):
    """Independent normalisation: transformers' float64 rescale, float32 cast, float32 subtract/divide."""
    scaled = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)


def test_video_layout_by_hand():
    # transformers' Qwen2VLVideoProcessor imports torchvision, which is not installed, so the layout is checked
    # against its definition: row (t, block_h, block_w, m_h, m_w) holds [C, T, P, P] values of frames 2t, 2t+1.
    frames = _pixels((3, 56, 84, 3), seed=5)  # multiples of 28: the resize is the identity
    pixel_values, grid_thw = ImageProcessor().preprocess_video(frames)
    np.testing.assert_array_equal(grid_thw, [2, 4, 6])
    padded = _normalised(np.concatenate([frames, frames[-1:]]))  # odd count: the last frame is repeated
    expected = []
    for t in range(2):
        for block_h in range(2):
            for block_w in range(3):
                for m_h in range(2):
                    for m_w in range(2):
                        y, x = (2 * block_h + m_h) * 14, (2 * block_w + m_w) * 14
                        patch_TxPxPxC = padded[2 * t : 2 * t + 2, y : y + 14, x : x + 14]
                        expected.append(patch_TxPxPxC.transpose(3, 0, 1, 2).reshape(-1))
    np.testing.assert_array_equal(pixel_values, np.stack(expected))


def test_video_frames_resize_like_images():
    frames = [_pixels((37, 61, 3), seed=s) for s in range(3)]
    processor = ImageProcessor()
    pixel_values, grid_thw = processor.preprocess_video(frames)
    np.testing.assert_array_equal(grid_thw, [2, 4, 6])
    video_TxNxCxTxPP = pixel_values.reshape(2, 24, 3, 2, 196)
    for slot, (t, frame) in enumerate([(0, 0), (0, 1), (1, 2), (1, 2)]):
        image_NxCxTxPP = processor.preprocess(frames[frame])[0].reshape(24, 3, 2, 196)
        np.testing.assert_array_equal(video_TxNxCxTxPP[t, :, :, slot % 2], image_NxCxTxPP[:, :, 0])
    # A one-frame video is a still image.
    np.testing.assert_array_equal(processor.preprocess_video(frames[:1])[0], processor.preprocess(frames[0])[0])
    with pytest.raises(ValueError, match="differ in size"):
        processor.preprocess_video([frames[0], _pixels((40, 61, 3))])
    with pytest.raises(ValueError, match="no frames"):
        processor.preprocess_video([])


def test_from_hf_hub_config(tmp_path):
    assert ImageProcessor.from_hf(HUB_CONFIG) == ImageProcessor()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(HUB_CONFIG))
    assert ImageProcessor.from_hf(tmp_path) == ImageProcessor()
    assert ImageProcessor.from_hf(tmp_path / "preprocessor_config.json") == ImageProcessor()


def test_from_hf_reads_transformers_saved_config(tmp_path):
    hf = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 8, max_pixels=SMALL_MAX_PIXELS, image_mean=[0.5] * 3)
    hf.save_pretrained(tmp_path)
    processor = ImageProcessor.from_hf(tmp_path)
    assert (processor.min_pixels, processor.max_pixels) == (28 * 28 * 8, SMALL_MAX_PIXELS)
    assert processor.image_mean == (0.5, 0.5, 0.5) and processor.image_std == tuple(CLIP_STD)
    _assert_same_as_hf(processor, _pixels((300, 411, 3)), hf)


def test_from_hf_defaults_and_precedence_follow_transformers(tmp_path):
    # Without pixel limits transformers uses its class defaults, not the hub values.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14}))
    hf = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    processor = ImageProcessor.from_hf(tmp_path)
    assert (processor.min_pixels, processor.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge)
    assert processor.max_pixels == 28 * 28 * 1280
    # Explicit min_pixels/max_pixels win over `size`.
    config = {"size": {"shortest_edge": 100, "longest_edge": 200_000}, "min_pixels": 5000}
    hf = Qwen2VLImageProcessorPil(**config)
    processor = ImageProcessor.from_hf(config)
    assert (processor.min_pixels, processor.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge)
    assert (processor.min_pixels, processor.max_pixels) == (5000, 200_000)


@pytest.mark.parametrize(
    "override, field",
    [
        ({"do_resize": False}, "do_resize"),
        ({"resample": 2}, "resample"),
        ({"do_normalize": False}, "do_normalize"),
        ({"rescale_factor": 1 / 127.5}, "rescale_factor"),
        ({"input_data_format": "channels_first"}, "input_data_format"),
        ({"size": {"height": 224, "width": 224}}, "size"),
        ({"do_sample_frames": True}, "do_sample_frames"),
    ],
)
def test_from_hf_rejects_settings_it_cannot_reproduce(override, field):
    with pytest.raises(ValueError, match=field):
        ImageProcessor.from_hf({**HUB_CONFIG, **override})


def test_from_hf_accepts_inert_and_default_settings():
    config = {**HUB_CONFIG, "do_resize": True, "resample": 3, "do_center_crop": None, "do_pad": False}
    assert ImageProcessor.from_hf(config) == ImageProcessor()


def test_processor_fields_are_validated_and_frozen():
    assert ImageProcessor(image_mean=list(CLIP_MEAN)) == ImageProcessor()
    assert ImageProcessor(image_mean=0.5).image_mean == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="image_std"):
        ImageProcessor(image_std=[0.5, 0.5])
    with pytest.raises(ValueError, match="min_pixels=4000 exceeds max_pixels=3000"):
        ImageProcessor(min_pixels=4000, max_pixels=3000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ImageProcessor().max_pixels = 1
