"""Qwen2.5-VL image and video preprocessing in numpy, matching transformers' `Qwen2VLImageProcessorPil`.

An image becomes rows of flattened patches: it is converted to RGB, resized with PIL bicubic so both sides are
multiples of `patch_size * merge_size` (`smart_resize`), scaled to [0, 1], normalised with the CLIP mean/std, and
cut into `patch_size` squares ordered block by block over the `merge_size x merge_size` merge blocks. A still image
fills the `temporal_patch_size` axis by repetition, so each row holds C*T*P*P = 1176 values for the real model.

Images are PIL images in any mode or uint8 arrays, (H, W) or channels-last (H, W, C) with C in {1, 3, 4}
(transformers guesses the channel axis of an array; here it is always the last one).
"""

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping

import numpy as np
import PIL.Image

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESCALE_FACTOR = 1 / 255
_MAX_ASPECT_RATIO = 200
_NUM_CHANNELS = 3
_PREPROCESSOR_CONFIG = "preprocessor_config.json"


def smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 16384):
    """Returns the (height, width) an image is resized to: multiples of `factor`, area in [min, max] pixels.

    Each side is rounded to the nearest multiple of `factor` (Python's round, half to even); if the area then
    leaves [min_pixels, max_pixels], both sides are rescaled by the same factor and floored (too large) or
    ceiled (too small) to multiples of `factor`. Identical to transformers' `smart_resize`.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} (height x width) must be positive")
    aspect_ratio = max(height, width) / min(height, width)
    if aspect_ratio > _MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of size {height}x{width} (height x width) has aspect ratio {aspect_ratio:.1f} > "
            f"{_MAX_ASPECT_RATIO}; crop or pad it to a less elongated shape, or drop it"
        )
    resized_height = round(height / factor) * factor
    resized_width = round(width / factor) * factor
    if resized_height * resized_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        resized_height = max(factor, math.floor(height / beta / factor) * factor)
        resized_width = max(factor, math.floor(width / beta / factor) * factor)
    elif resized_height * resized_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        resized_height = math.ceil(height * beta / factor) * factor
        resized_width = math.ceil(width * beta / factor) * factor
    return resized_height, resized_width


@functools.lru_cache(maxsize=16)
def _normalisation_table(image_mean, image_std):
    """(C, 256) float32 table: the normalised value of each uint8 level in each channel.

    The arithmetic is transformers' exactly (rescale in float64 then cast to float32, then subtract and divide
    in float32), so a lookup reproduces its output bit for bit at a fraction of the cost.
    """
    levels = (np.arange(256, dtype=np.float64) * _RESCALE_FACTOR).astype(np.float32)
    mean = np.asarray(image_mean, dtype=np.float32)[:, None]
    std = np.asarray(image_std, dtype=np.float32)[:, None]
    return (levels[None, :] - mean) / std


def _to_rgb(image):
    """An RGB uint8 PIL image, converted the way transformers does (transparency composited onto white)."""
    if isinstance(image, PIL.Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(
            f"image array has dtype {image.dtype}; pass uint8 pixel values in [0, 255] "
            "(e.g. `(x * 255).round().astype(np.uint8)` for floats in [0, 1])"
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image array has shape {image.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) "
            "(channels last)"
        )
    channels = image.shape[-1]
    if channels == 1:
        image = np.repeat(image, 3, axis=-1)
    elif channels == 4:
        alpha = image[..., 3:] / 255
        image = np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return PIL.Image.fromarray(image)


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """Turns images and videos into Qwen2.5-VL `pixel_values` rows and `grid_thw` (t, h, w) patch grids.

    Defaults are the published Qwen2.5-VL `preprocessor_config.json` values (note transformers' class default
    `max_pixels` is smaller, 28*28*1280).
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384
    image_mean: tuple[float, ...] = _CLIP_MEAN
    image_std: tuple[float, ...] = _CLIP_STD

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} exceeds max_pixels={self.max_pixels}")
        for name in ("image_mean", "image_std"):
            value = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
            if value.size == 1:
                value = np.repeat(value, _NUM_CHANNELS)
            if value.size != _NUM_CHANNELS:
                raise ValueError(f"{name}={getattr(self, name)!r} needs one value or one per RGB channel")
            # Stored as a tuple of floats so the processor stays hashable and equal across list/tuple inputs.
            object.__setattr__(self, name, tuple(value.tolist()))
        if 0.0 in self.image_std:
            raise ValueError(f"image_std={self.image_std} has a zero entry")

    @property
    def patch_dim(self):
        """Values per `pixel_values` row: C * T * P * P (1176 for Qwen2.5-VL)."""
        return _NUM_CHANNELS * self.temporal_patch_size * self.patch_size**2

    @property
    def factor(self):
        """Resized sides are multiples of this: one merge block of patches, in pixels."""
        return self.patch_size * self.merge_size

    def num_image_tokens(self, grid_thw):
        """Language-model placeholder tokens for one (t, h, w) row (an int) or an (n, 3) array (n,)."""
        grid_thw = np.asarray(grid_thw, dtype=np.int64)
        if grid_thw.shape[-1:] != (3,) or grid_thw.ndim > 2:
            raise ValueError(f"grid_thw has shape {grid_thw.shape}; expected (3,) or (n, 3)")
        tokens = np.prod(grid_thw, axis=-1) // self.merge_size**2
        return int(tokens) if grid_thw.ndim == 1 else tokens

    def preprocess(self, image):
        """One image -> (pixel_values float32 (h*w, patch_dim), grid_thw int64 (3,) = (1, h, w)).

        Identical to transformers' `Qwen2VLImageProcessorPil` with the same settings, bit for bit.
        """
        frame = self._normalise(self._resize_frames([image]))
        return self._patchify(np.broadcast_to(frame, (self.temporal_patch_size, *frame.shape[1:])))

    def preprocess_images(self, images):
        """Several images -> (pixel_values rows of all images in order, grid_thw int64 (n, 3))."""
        outputs = []
        for index, image in enumerate(images):
            try:
                outputs.append(self.preprocess(image))
            except (TypeError, ValueError) as error:
                raise type(error)(f"image {index}: {error}") from error
        if not outputs:
            return np.zeros((0, self.patch_dim), np.float32), np.zeros((0, 3), np.int64)
        pixel_values, grids = zip(*outputs, strict=True)
        return np.concatenate(pixel_values), np.stack(grids)

    def preprocess_video(self, frames):
        """Video frames -> (pixel_values float32 (t*h*w, patch_dim), grid_thw int64 (3,) = (t, h, w)).

        `frames` is an (F, H, W[, C]) uint8 array or a sequence of same-sized images. As in transformers'
        `Qwen2VLVideoProcessor`, the last frame is repeated up to a multiple of `temporal_patch_size`, so
        t = ceil(F / T), and each row holds T consecutive frames of one patch; rows run over time, then merge
        blocks, as for images. Frames are resized with PIL bicubic like images (transformers' video processor
        resizes with torchvision, whose pixel values differ slightly when the size changes).
        """
        if len(frames) == 0:
            raise ValueError("video has no frames; pass at least one frame")
        resized = self._resize_frames(list(frames))
        pad = -len(resized) % self.temporal_patch_size
        if pad:
            resized = np.concatenate([resized, np.repeat(resized[-1:], pad, axis=0)])
        return self._patchify(self._normalise(resized))

    def _resize_frames(self, frames):
        """(F, H', W', 3) uint8: each frame in RGB at its `smart_resize` size, which must agree across frames."""
        rgb = [_to_rgb(frame) for frame in frames]
        sizes = {image.size for image in rgb}
        if len(sizes) > 1:
            raise ValueError(f"video frames differ in size (width, height): {sorted(sizes)}; resize them to one")
        width, height = rgb[0].size
        size_hw = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return np.stack([np.asarray(image.resize(size_hw[::-1], PIL.Image.Resampling.BICUBIC)) for image in rgb])

    def _normalise(self, frames_FxHxWxC):
        """uint8 pixels -> float32 rescaled and normalised values, via the exact lookup table."""
        table = _normalisation_table(self.image_mean, self.image_std)
        return table[np.arange(_NUM_CHANNELS), frames_FxHxWxC]

    def _patchify(self, frames_FxHxWxC):
        """Lays out the patches of normalised frames (a multiple of T of them) in transformers' row order."""
        num_frames, height, width, channels = frames_FxHxWxC.shape
        t, m, p = self.temporal_patch_size, self.merge_size, self.patch_size
        grid = np.array([num_frames // t, height // p, width // p], dtype=np.int64)
        blocks = frames_FxHxWxC.reshape(grid[0], t, grid[1] // m, m, p, grid[2] // m, m, p, channels)
        # -> (t_grid, h_blocks, w_blocks, m_h, m_w, C, T, P, P): block-major rows, channel-major within a row.
        blocks = blocks.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
        return blocks.reshape(-1, self.patch_dim), grid

    @classmethod
    def from_hf(cls, source):
        """Builds the processor a transformers `preprocessor_config.json` describes (a directory, file or dict).

        Missing pixel limits take transformers' class defaults (min 56*56, max 28*28*1280), as loading the file
        with transformers would. Settings this processor cannot reproduce raise, naming the field.
        """
        if isinstance(source, Mapping):
            config = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, _PREPROCESSOR_CONFIG)
            with open(path) as f:
                config = json.load(f)
        return cls(**_fields_from_hf(config))


# Settings whose value must be the one this processor implements (None means transformers' class default).
_REQUIRED_HF_SETTINGS = {
    "do_resize": True,
    "resample": int(PIL.Image.Resampling.BICUBIC),
    "do_rescale": True,
    "rescale_factor": _RESCALE_FACTOR,
    "do_normalize": True,
    "do_convert_rgb": True,
}
# Settings that do not change the Qwen2-VL processor's output: metadata, output container options, and crop/pad
# options its patchifying `_preprocess` never reads.
_INERT_HF_SETTINGS = frozenset({
    "image_processor_type", "processor_class", "auto_map", "default_to_square", "data_format", "device",
    "return_tensors", "disable_grouping", "image_seq_length", "do_center_crop", "crop_size", "do_pad", "pad_size",
})
_HF_PIXEL_LIMIT_DEFAULTS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280}


def _fields_from_hf(config):
    """`ImageProcessor` keyword arguments from a transformers image processor config dict."""
    size_limits, fields = {}, {}
    for key, value in config.items():
        if key in _INERT_HF_SETTINGS or value is None:
            continue
        if key in _REQUIRED_HF_SETTINGS:
            if value != _REQUIRED_HF_SETTINGS[key]:
                raise ValueError(
                    f"preprocessor config sets {key}={value!r}; this processor implements only "
                    f"{key}={_REQUIRED_HF_SETTINGS[key]!r}; remove the field or set it to that value"
                )
        elif key == "input_data_format":
            if value != "channels_last":
                raise ValueError(
                    f"preprocessor config sets input_data_format={value!r}; this processor reads channels-last "
                    "arrays; remove the field and pass (H, W, C) arrays"
                )
        elif key == "size":
            size_limits = _pixel_limits_from_size(value)
        elif key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            fields[key] = int(value)
        elif key in ("image_mean", "image_std"):
            fields[key] = value
        else:
            raise ValueError(
                f"preprocessor config has unknown setting {key!r}={value!r}, which may change the output; "
                "remove it if it is inert, or extend ImageProcessor to implement it"
            )
    # Explicit min_pixels/max_pixels win over `size`, as in transformers' constructor.
    return {**_HF_PIXEL_LIMIT_DEFAULTS, **size_limits, **fields}


def _pixel_limits_from_size(size):
    if not isinstance(size, Mapping) or set(size) - {"shortest_edge", "longest_edge"}:
        raise ValueError(
            f"preprocessor config has size={size!r}; expected a dict with 'shortest_edge' (min pixels) and "
            "'longest_edge' (max pixels)"
        )
    names = {"shortest_edge": "min_pixels", "longest_edge": "max_pixels"}
    return {names[key]: int(value) for key, value in size.items()}


__all__ = ["ImageProcessor", "smart_resize"]
