"""Qwen2.5-VL multimodal rotary (M-RoPE) position ids, computed host-side in numpy.

Every token gets a (temporal, height, width) position. Text tokens use the same running index on all three axes.
The merged tokens of an image or video form a grid starting at the running index: temporal positions step by the
frame interval (`tokens_per_second * second_per_grid_ts` for videos, 1 for images), height and width by one per merged
row and column. After a grid the running index advances by `max(h, w) // spatial_merge_size`; the temporal extent
is ignored, so text after a long video can share positions with its later frames. Padding (attention_mask 0) is
skipped and gets position 0. This is exactly transformers 5.23 `Qwen2_5_VLModel.get_rope_index`.

`rope_deltas[b] = max position + 1 - valid tokens` carries row b into decoding: the k-th generated token (k = 0, 1,
…) has position `valid tokens + k + rope_deltas[b]` on all three axes.
"""

import numpy as np

_TEXT, _IMAGE, _VIDEO = 0, 1, 2


def get_rope_index(
    input_ids,
    image_grid_thw,
    attention_mask,
    config,
    video_grid_thw=None,
    second_per_grid_ts=None,
):
    """Returns (position_ids int32 (3, B, L), rope_deltas int32 (B,)) for a batch of token ids.

    Args:
      input_ids: (B, L) token ids holding one placeholder token per merged image/video token.
      image_grid_thw: (num_images, 3) patch grids (t, h, w), consumed in order across the batch, or None.
      attention_mask: (B, L), nonzero for real tokens (padding may sit anywhere, usually on the left), or None.
      config: read only for `image_token_id`, `video_token_id`, `vision_config.spatial_merge_size` and
        `vision_config.tokens_per_second`; a `Qwen2_5_VLConfig` of this package or of transformers both work.
      video_grid_thw: (num_videos, 3) patch grids, consumed in order across the batch, or None.
      second_per_grid_ts: (num_videos,) seconds per temporal grid step, or None for 1 second each. The frame
        interval is computed in this array's dtype (float32 in transformers' processor output), then truncated,
        as torch does.

    Arrays may be numpy or jax. A row of only padding gets positions 0 and delta 0.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    if attention_mask is None:
        valid = np.ones(input_ids.shape, bool)
    else:
        valid = np.asarray(attention_mask).astype(bool)
        if valid.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {valid.shape} differs from input_ids shape {input_ids.shape}"
            )
    merge = int(config.vision_config.spatial_merge_size)
    tokens_per_second = config.vision_config.tokens_per_second
    if tokens_per_second != int(tokens_per_second):
        raise ValueError(
            f"config.vision_config.tokens_per_second must be a whole number (transformers requires an int), "
            f"got {tokens_per_second}"
        )
    tokens_per_second = int(tokens_per_second)
    grids = {
        _IMAGE: _Grids("image", image_grid_thw),
        _VIDEO: _Grids("video", video_grid_thw),
    }
    seconds = None if second_per_grid_ts is None else np.asarray(second_per_grid_ts).reshape(-1)

    token_type = np.zeros(input_ids.shape, np.int8)
    token_type[input_ids == config.image_token_id] = _IMAGE
    token_type[input_ids == config.video_token_id] = _VIDEO

    batch, length = input_ids.shape
    position_ids = np.zeros((3, batch, length), np.int32)
    rope_deltas = np.zeros((batch,), np.int32)
    for b in range(batch):
        types = token_type[b, valid[b]]
        if types.size == 0:
            continue
        run_starts = np.concatenate([[0], np.flatnonzero(np.diff(types)) + 1])
        run_ends = np.concatenate([run_starts[1:], [types.size]])
        chunks = []
        start = 0
        for s, e in zip(run_starts, run_ends):
            kind = int(types[s])
            if kind == _TEXT:
                chunks.append(np.broadcast_to(np.arange(start, start + e - s), (3, e - s)))
                start += e - s
                continue
            grid = grids[kind].next(row=b)
            if kind == _IMAGE:
                interval = np.int64(1)
            else:
                video_index = grids[_VIDEO].consumed - 1
                interval = _frame_interval(tokens_per_second, seconds, video_index)
            chunk = _grid_positions(grid, merge, interval, start)
            if chunk.shape[1] != e - s:
                raise ValueError(
                    f"row {b} has a run of {e - s} {grids[kind].name} placeholder tokens but "
                    f"{grids[kind].name} {grids[kind].consumed - 1} has grid {tuple(grid)}, which needs "
                    f"{chunk.shape[1]} (t*h*w/{merge ** 2}); make input_ids hold one placeholder per merged "
                    f"token, with each {grids[kind].name} separated from the next by a non-placeholder token"
                )
            chunks.append(chunk)
            start += max(grid[1], grid[2]) // merge
        positions = np.concatenate(chunks, axis=1)
        position_ids[:, b, valid[b]] = positions
        rope_deltas[b] = positions.max() + 1 - types.size
    for g in grids.values():
        g.check_all_used()
    return position_ids, rope_deltas


class _Grids:
    """The (t, h, w) rows of one modality, handed out in order across the batch."""

    def __init__(self, name, grid_thw):
        self.name = name
        self.rows = np.zeros((0, 3), np.int64) if grid_thw is None else np.asarray(grid_thw, np.int64)
        if self.rows.ndim != 2 or self.rows.shape[1] != 3:
            raise ValueError(f"{name}_grid_thw must be (num_{name}s, 3), got shape {self.rows.shape}")
        self.consumed = 0

    def next(self, row):
        if self.consumed == len(self.rows):
            raise ValueError(
                f"row {row} holds {self.name} placeholder tokens beyond the {len(self.rows)} rows of "
                f"{self.name}_grid_thw; pass one grid per {self.name}, in order across the batch"
            )
        self.consumed += 1
        return self.rows[self.consumed - 1]

    def check_all_used(self):
        if self.consumed != len(self.rows):
            raise ValueError(
                f"{self.name}_grid_thw has {len(self.rows)} rows but input_ids hold placeholder runs for only "
                f"{self.consumed} {self.name}s; pass only the grids of the {self.name}s in this batch"
            )


def _frame_interval(tokens_per_second, seconds, video_index):
    """Temporal step of video `video_index`, typed as torch types `tokens_per_second * second_per_grid_ts`."""
    if seconds is None:
        return np.int64(tokens_per_second)
    if video_index >= seconds.size:
        raise ValueError(
            f"second_per_grid_ts has {seconds.size} entries but video {video_index} needs one; "
            "pass one per video, in order across the batch"
        )
    # A numpy scalar times a Python int keeps the scalar's dtype (NEP 50), like a 0-d torch tensor does.
    return seconds[video_index] * tokens_per_second


def _grid_positions(grid, merge, interval, start):
    """(3, t*h*w/merge²) positions of one image/video grid, t-major then h then w, offset by `start`."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    steps = np.arange(t)
    if np.issubdtype(interval.dtype, np.floating):
        temporal = (steps.astype(interval.dtype) * interval).astype(np.int64)
    else:
        temporal = steps * int(interval)
    return np.stack([
        np.repeat(temporal + start, h * w),
        np.tile(np.repeat(np.arange(start, start + h), w), t),
        np.tile(np.arange(start, start + w), t * h),
    ])
