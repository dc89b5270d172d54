"""grain input pipelines: prepared task splits -> fixed-size, bucket-padded batches for the jitted steps.

    sources = {"count": tasks.load_split("synthetic/count", "train", data_dir), ...}
    loader = Loader(sources, mode="sft", tokenizer=tokenizer, config=model_config, batch_size=8,
                    buckets=Buckets(lengths=(256, 512), patches=(2048, 8192)),
                    processor=ImageProcessor(max_pixels=28 * 28 * 256), template="plain", seed=0)
    iterator = iter(loader)
    batch = next(iterator)        # batch.device: a pytree of numpy arrays; batch.host: ids, answers, tasks, grids
    state = iterator.get_state()  # JSON; `iter(loader).set_state(state)` continues at the next example

Each task is read in the grain order source -> shard -> shuffle -> repeat -> encode, then the tasks are mixed by
weight. Sharding comes first, so every process keeps the same disjoint slice of each task in every epoch, and
`repeat` re-seeds the shuffle each epoch. Encoding (image decode, resize and patchify with the `ImageProcessor`,
prompt rendering and tokenization with the chosen template, M-RoPE positions with `get_rope_index`) runs in
grain's reader threads; it is a pure function of the example, so thread timing never changes a batch.

The consumer thread then drops the examples no bucket holds, counting each one per task and warning with its id
(or raising `BadExampleError` in strict mode), and pads the rest into batches: SFT rows on the right, prompts
(RFT rollouts, evaluation) on the left, to the smallest declared length bucket; the batch's image patches to the
smallest patch bucket. Nothing is ever truncated.

Multi-host: each process batches its own shard and picks its buckets from its own rows; before the processes'
batches form one global array, `Loader.align` pads every process's batch to the largest buckets chosen at that
step. A finite pass yields `Loader.num_batches` batches on every process, the last ones filled with dummy rows
(`valid` False) where a shard runs short.
"""

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping

import grain
import jax
import numpy as np
from flax import struct
from jax.experimental import multihost_utils

from cpt_jax.data.processor import ImageProcessor
from cpt_jax.data.prompts import PROMPT_TEMPLATES, encode_prompt, encode_sft_example
from cpt_jax.data.tasks.base import BadExampleError, Skip, SplitReport
from cpt_jax.data.tokenizer import special_token_ids
from cpt_jax.models.qwen2_5_vl import VisionInputs, get_rope_index, vision_inputs

logger = logging.getLogger(__name__)

# Part of a checkpointed state that must match the loader restoring it, or the restored data would differ.
_STATE_SETTINGS = ("mode", "batch_size", "seed", "shuffle", "num_epochs", "shard_index", "shard_count", "weights",
                   "sizes")


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The padded shapes batches may take: `lengths` (tokens per row) and `patches` (image patch rows per batch).

    A batch takes the smallest length bucket that holds its longest row and the smallest patch bucket that holds
    all its patches (no patch bucket when it has no image). An example fits when its tokens fit the largest length
    bucket and its patches number at most `patches[-1] // batch_size`, so every batch of fitting examples fits.
    `patches` may be empty for text-only data.
    """

    lengths: tuple[int, ...]
    patches: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("lengths", "patches"):
            values = tuple(int(v) for v in getattr(self, name))
            if any(v <= 0 for v in values) or list(values) != sorted(set(values)):
                raise ValueError(f"Buckets.{name}={values} must be positive and strictly increasing")
            object.__setattr__(self, name, values)
        if not self.lengths:
            raise ValueError("Buckets.lengths is empty; declare at least one token length")

    def length(self, num_tokens):
        """The smallest length bucket holding `num_tokens` tokens."""
        return _smallest_holding(self.lengths, num_tokens, "length")

    def num_patches(self, num_patches):
        """The smallest patch bucket holding `num_patches` patches."""
        return _smallest_holding(self.patches, num_patches, "patch")


def _smallest_holding(buckets, size, what):
    for bucket in buckets:
        if size <= bucket:
            return bucket
    raise ValueError(f"{size} exceeds the largest {what} bucket of {buckets}")


@struct.dataclass
class SFTBatch:
    """Prompt + answer rows, right-padded: the device half of an SFT batch (B rows, L tokens).

    input_ids (B, L) int32 (pad id after the tokens); attention_mask (B, L) int32; position_ids (3, B, L) int32
    M-RoPE positions, 0 on padding; loss_mask (B, L) int32, 1 where the token belongs to the answer turn (so it
    is the target of the logits one position earlier); valid (B,) bool, False on the dummy rows that fill a last
    partial batch (they are all padding, loss_mask 0); vision: the batch's images padded to a patch bucket, or
    None when the batch holds no image.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    loss_mask: np.ndarray
    valid: np.ndarray
    vision: VisionInputs | None


@struct.dataclass
class PromptBatch:
    """Prompts ending with the opened assistant turn, left-padded: the device half of an RFT or evaluation batch.

    Fields as in `SFTBatch`, without a loss mask: every row's last token sits at position L - 1, so generation
    appends to all rows at once. Rewards and metrics of rows with `valid` False must be ignored.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    valid: np.ndarray
    vision: VisionInputs | None


@dataclasses.dataclass(frozen=True)
class HostBatch:
    """The host-only half of a batch: per row the example id, reference answer and task ("" on dummy rows), and
    the (t, h, w) grids of the batch's images in row order (num_images, 3)."""

    ids: list[str]
    answers: list[str]
    tasks: list[str]
    grid_thw: np.ndarray


@dataclasses.dataclass(frozen=True)
class Batch:
    """What a loader yields: `device` goes to the jitted step, `host` stays in Python (rewards, logging)."""

    device: SFTBatch | PromptBatch
    host: HostBatch


@dataclasses.dataclass(frozen=True)
class _Mode:
    batch_type: type
    left_padding: bool


# "sft": prompt + answer with a loss mask; "prompt": the prompt alone, for RFT rollouts and evaluation.
MODES = {
    "sft": _Mode(batch_type=SFTBatch, left_padding=False),
    "prompt": _Mode(batch_type=PromptBatch, left_padding=True),
}


@dataclasses.dataclass(frozen=True)
class _Encoded:
    """One example, ready to batch; made in grain's reader threads."""

    task: str
    id: str
    answer: str
    input_ids: np.ndarray  # (n,) int32
    loss_mask: np.ndarray | None  # (n,) int32, SFT only
    position_ids: np.ndarray  # (3, n) int32
    pixel_values: np.ndarray  # (patches, patch_dim) float32
    grid_thw: np.ndarray  # (images, 3) int64


class Loader:
    """A multi-task, sharded, shuffled stream of bucket-padded batches; `iter(loader)` starts a `BatchIterator`.

    Args:
      sources: task name -> random-access examples {"id", "question", "answer", "images"} (e.g. `load_split`).
      mode: a key of `MODES`: "sft" or "prompt".
      tokenizer: a Qwen2.5-VL tokenizer (`load_tokenizer`) whose special ids `config` uses.
      config: the model's `Qwen2_5_VLConfig` (image token id, vision geometry for positions and vision inputs).
      batch_size: rows per batch on this process.
      buckets: the declared `Buckets`; patch buckets must be multiples of the vision merge unit.
      processor: resizes and patchifies images (min/max pixels); defaults to the config's patch geometry with the
        published pixel limits.
      template: prompt template name (`prompts.PROMPT_TEMPLATES`); system: replaces the default system prompt.
      weights: task name -> mixing weight (default equal: round robin). A finite mixture ends when its first
        task runs out, so give it weights proportional to the task sizes.
      seed: shuffle seed; shuffle: False keeps each shard in source order (evaluation).
      num_epochs: passes over each task, None to repeat forever.
      drop_remainder: drop a last partial batch instead of filling it with dummy rows.
      shard_index, shard_count: this process's slice of every task (default: the JAX process index and count).
      strict: raise `BadExampleError` on an example no bucket holds instead of skipping it.
      num_threads, prefetch: grain reader threads and encoded examples read ahead (default 2 batches).
      target_format: the SFT target text made from the reference answer (e.g. a CoT layout with the answer in
        \\boxed{}, so SFT learns the format the reward and evaluation read); "{answer}" trains on the bare answer.
    """

    def __init__(self, sources, *, mode, tokenizer, config, batch_size, buckets, processor=None, template="cot",
                 system=None, weights=None, seed=0, shuffle=True, num_epochs=None, drop_remainder=False,
                 shard_index=None, shard_count=None, strict=False, num_threads=8, prefetch=None,
                 target_format="{answer}"):
        if mode not in MODES:
            raise ValueError(f"unknown pipeline mode {mode!r}; choose one of {sorted(MODES)}")
        if not isinstance(sources, Mapping) or not sources:
            raise ValueError("sources must be a non-empty mapping from task name to examples (e.g. load_split)")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if template not in PROMPT_TEMPLATES:
            raise ValueError(f"unknown prompt template {template!r}; choose one of {sorted(PROMPT_TEMPLATES)}")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs={num_epochs} must be positive, or None to repeat forever")
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} must lie in [0, shard_count={shard_count})")
        for task, source in sources.items():
            if len(source) < shard_count:
                raise ValueError(f"task {task!r} has {len(source)} examples, fewer than the {shard_count} shards; "
                                 "every process needs at least one")
        self.sources = dict(sources)
        self.sizes = {task: len(source) for task, source in self.sources.items()}
        self.weights = self._check_weights(weights)
        self.mode = mode
        self.tokenizer = tokenizer
        self.config = config
        self.processor = processor or ImageProcessor(
            patch_size=config.vision.patch_size, temporal_patch_size=config.vision.temporal_patch_size,
            merge_size=config.vision.spatial_merge_size)
        self.batch_size = batch_size
        self.buckets = buckets
        self.template, self.system = template, system
        if "{answer}" not in target_format:
            raise ValueError(f"target_format {target_format!r} must contain '{{answer}}'")
        self.target_format = target_format
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.drop_remainder = drop_remainder
        self.shard_index, self.shard_count = shard_index, shard_count
        self.strict = strict
        self.read_options = grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=2 * batch_size if prefetch is None else prefetch)
        self._pad_id = special_token_ids(tokenizer)["pad"]
        self._check_geometry()

    def _check_weights(self, weights):
        if weights is None:
            return None
        if set(weights) != set(self.sources):
            raise ValueError(f"weights name tasks {sorted(weights)} but the sources are {sorted(self.sources)}; "
                             "give one weight per task")
        if any(weights[task] <= 0 for task in weights):
            raise ValueError(f"weights {dict(weights)} must all be positive; leave a task out instead")
        return [float(weights[task]) for task in self.sources]

    def _check_geometry(self):
        ids = special_token_ids(self.tokenizer)
        for name, token in (("image_token_id", "image_pad"), ("video_token_id", "video_pad")):
            if getattr(self.config, name) != ids[token]:
                raise ValueError(f"config.{name}={getattr(self.config, name)} but the tokenizer's {token} id is "
                                 f"{ids[token]}; use the tokenizer the model was built or trained with")
        vision, processor = self.config.vision, self.processor
        for ours, theirs in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                             ("merge_size", "spatial_merge_size")):
            if getattr(processor, ours) != getattr(vision, theirs):
                raise ValueError(f"processor {ours}={getattr(processor, ours)} differs from the model's "
                                 f"vision.{theirs}={getattr(vision, theirs)}; build the ImageProcessor to match")
        bad = [p for p in self.buckets.patches if p % vision.merge_unit]
        if bad:
            raise ValueError(f"patch buckets {bad} are not multiples of the merge unit {vision.merge_unit}")

    # --- the grain dataset --------------------------------------------------------------------------------------

    def dataset(self, shard_index=None):
        """The grain `MapDataset` of encoded examples of shard `shard_index` (default this process's)."""
        shard_index = self.shard_index if shard_index is None else shard_index
        parts = []
        for task_index, (task, source) in enumerate(self.sources.items()):
            ds = grain.MapDataset.source(source)[shard_index::self.shard_count]
            if self.shuffle:
                # Folding in the shard decorrelates the processes' orders, so a global batch is not made of
                # neighbours in the source order.
                task_seed = np.random.SeedSequence([self.seed, task_index, shard_index]).generate_state(1)[0]
                ds = ds.shuffle(seed=int(task_seed))
            ds = ds.repeat(self.num_epochs)
            parts.append(ds.map(functools.partial(self._encode, task)))
        return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, self.weights)

    @functools.cached_property
    def num_batches(self):
        """Batches in a finite pass, the same on every process (the longest shard's count); None when the stream
        repeats forever or drops its remainder."""
        if self.num_epochs is None or self.drop_remainder:
            return None
        longest = max(len(self.dataset(shard)) for shard in range(self.shard_count))
        return math.ceil(longest / self.batch_size)

    def _encode(self, task, example):
        try:
            pixel_values, grid_thw = self.processor.preprocess_images(example["images"])
            merge_size = self.processor.merge_size
            if self.mode == "sft":
                input_ids, loss_mask = encode_sft_example(
                    self.tokenizer, example["question"], self.target_format.format(answer=example["answer"]),
                    grid_thw, merge_size, self.template,
                    self.system, record_id=example["id"])
            else:
                loss_mask = None
                input_ids = encode_prompt(self.tokenizer, example["question"], grid_thw, merge_size, self.template,
                                          self.system, record_id=example["id"])
            position_ids, _ = get_rope_index(input_ids[None], grid_thw, None, self.config)
        except (TypeError, ValueError) as error:
            error.add_note(f"while encoding {task} example {example['id']!r}")
            raise
        return _Encoded(task, example["id"], example["answer"], input_ids, loss_mask, position_ids[:, 0],
                        pixel_values, grid_thw)

    def __iter__(self):
        return BatchIterator(self)

    # --- batches ------------------------------------------------------------------------------------------------

    def _check_fits(self, example):
        """Raises `Skip` when no bucket holds `example` (an encoded example)."""
        num_tokens, largest = len(example.input_ids), self.buckets.lengths[-1]
        if num_tokens > largest:
            raise Skip("too_long", f"it has {num_tokens} tokens > the largest length bucket {largest}",
                       "declare a larger length bucket, or shorten the prompt")
        num_patches, patches = len(example.pixel_values), self.buckets.patches
        if num_patches and not patches:
            raise Skip("too_many_patches", f"its images have {num_patches} patches but no patch bucket is declared",
                       "declare patch buckets")
        limit = patches[-1] // self.batch_size if patches else 0
        if num_patches > limit:
            raise Skip("too_many_patches", f"its images have {num_patches} patches > {limit} (the largest patch "
                       f"bucket {patches[-1]} over {self.batch_size} rows)",
                       "lower the processor's max_pixels, or declare a larger patch bucket")

    def _collate(self, examples):
        """A `Batch` of up to batch_size encoded examples, filled with dummy rows, padded to the buckets."""
        size = self.batch_size
        length = self.buckets.length(max((len(e.input_ids) for e in examples), default=0))
        input_ids = np.full((size, length), self._pad_id, np.int32)
        attention_mask = np.zeros((size, length), np.int32)
        position_ids = np.zeros((3, size, length), np.int32)
        loss_mask = np.zeros((size, length), np.int32) if self.mode == "sft" else None
        left = MODES[self.mode].left_padding
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            at = slice(length - n, length) if left else slice(0, n)
            input_ids[row, at] = example.input_ids
            attention_mask[row, at] = 1
            position_ids[:, row, at] = example.position_ids
            if loss_mask is not None:
                loss_mask[row, at] = example.loss_mask
        fields = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      valid=np.arange(size) < len(examples))
        if loss_mask is not None:
            fields["loss_mask"] = loss_mask
        grid_thw = np.concatenate([np.zeros((0, 3), np.int64)] + [e.grid_thw for e in examples])
        patch_dim = self.config.vision.patch_dim
        pixel_values = np.concatenate([np.zeros((0, patch_dim), np.float32)] + [e.pixel_values for e in examples])
        num_patches = self.buckets.num_patches(len(pixel_values)) if len(pixel_values) else 0
        fields["vision"] = self._vision(pixel_values, grid_thw, num_patches)
        dummy = [""] * (size - len(examples))
        host = HostBatch(ids=[e.id for e in examples] + dummy, answers=[e.answer for e in examples] + dummy,
                         tasks=[e.task for e in examples] + dummy, grid_thw=grid_thw)
        return Batch(MODES[self.mode].batch_type(**fields), host)

    def _vision(self, pixel_values, grid_thw, num_patches):
        if num_patches == 0:
            return None
        return vision_inputs(pixel_values, grid_thw, self.config.vision, pad_to=num_patches)

    def pad(self, batch, length, num_patches):
        """`batch` re-padded to `length` tokens per row and `num_patches` patches, as the loader would have padded
        it with those buckets; `num_patches` 0 leaves a batch without images without vision inputs."""
        device = batch.device
        current_length = device.input_ids.shape[1]
        current_patches = 0 if device.vision is None else device.vision.pixel_values.shape[0]
        if length < current_length or num_patches < current_patches:
            raise ValueError(f"cannot pad a batch of length {current_length} with {current_patches} patches to "
                             f"length {length} with {num_patches} patches; padding only grows")
        extra = length - current_length
        widths = (extra, 0) if MODES[self.mode].left_padding else (0, extra)

        def widen(x, value=0):
            return np.pad(x, [(0, 0)] * (x.ndim - 1) + [widths], constant_values=value)

        fields = dict(input_ids=widen(device.input_ids, self._pad_id), attention_mask=widen(device.attention_mask),
                      position_ids=widen(device.position_ids))
        if self.mode == "sft":
            fields["loss_mask"] = widen(device.loss_mask)
        if num_patches != current_patches:
            # The real patch rows come first, in the processor's order, then zero rows.
            real_patches = int(np.prod(batch.host.grid_thw, axis=1).sum())
            pixel_values = (np.zeros((0, self.config.vision.patch_dim), np.float32) if device.vision is None
                            else device.vision.pixel_values[:real_patches])
            fields["vision"] = self._vision(pixel_values, batch.host.grid_thw, num_patches)
        return dataclasses.replace(batch, device=device.replace(**fields))

    def align(self, batch):
        """`batch` padded to the largest length and patch buckets any process chose at this step.

        Call it on every process, in the same thread as the step, before the processes' batches form one global
        array; it costs one small all-gather, and nothing on a single process.
        """
        if jax.process_count() == 1:
            return batch
        vision = batch.device.vision
        shape = np.array([batch.device.input_ids.shape[1], 0 if vision is None else len(vision.pixel_values)])
        length, num_patches = multihost_utils.process_allgather(shape).max(axis=0)
        return self.pad(batch, int(length), int(num_patches))


class BatchIterator:
    """The batches of a `Loader`, with a JSON-serialisable position (`get_state` / `set_state`).

    `reports` holds a `SplitReport` per task: examples read, kept, and skipped by kind; a finite pass logs their
    summaries when it ends.
    """

    def __init__(self, loader):
        self.loader = loader
        self._examples = iter(loader.dataset().to_iter_dataset(loader.read_options))
        self._num_batches = 0
        self._exhausted = self._summarised = False
        self.reports = {task: SplitReport(task) for task in loader.sources}

    def __iter__(self):
        return self

    def __next__(self):
        loader = self.loader
        examples = []
        while len(examples) < loader.batch_size and not self._exhausted:
            try:
                example = next(self._examples)
            except StopIteration:
                self._exhausted = True
                break
            if self._keep(example):
                examples.append(example)
        if self._exhausted and (loader.drop_remainder or not examples) and not self._owes_padding_batch():
            if not self._summarised:
                self._summarise()
            raise StopIteration
        self._num_batches += 1
        return loader._collate(examples)

    def _owes_padding_batch(self):
        """Whether this process still owes a batch to reach the pass length every process shares."""
        total = self.loader.num_batches
        return total is not None and self._num_batches < total

    def _keep(self, example):
        report = self.reports[example.task]
        report.total += 1
        try:
            self.loader._check_fits(example)
        except Skip as skip:
            where = f"{example.task} example {example.id!r}"
            if self.loader.strict:
                raise BadExampleError(
                    f"{where}: {skip.message}. Fix: {skip.fix}; or run without strict to skip such examples"
                ) from None
            report.skipped[skip.kind] += 1
            logger.warning("skipping %s: %s", where, skip.message)
            return False
        report.kept += 1
        return True

    def _summarise(self):
        for report in self.reports.values():
            (logger.warning if report.skipped else logger.info)("pipeline %s", report.summary())
        self._summarised = True

    def get_state(self):
        """The position after the last batch returned, with the settings it depends on (JSON-serialisable)."""
        loader = self.loader
        return {
            "examples": self._examples.get_state(),
            "batches": self._num_batches,
            "reports": {task: report.as_dict() for task, report in self.reports.items()},
            **{name: getattr(loader, name) for name in _STATE_SETTINGS},
        }

    def set_state(self, state):
        """Continues from a `get_state` result of a loader with the same data settings."""
        loader = self.loader
        for name in _STATE_SETTINGS:
            if state[name] != getattr(loader, name):
                raise ValueError(f"the iterator state was saved with {name}={state[name]!r} but this loader has "
                                 f"{name}={getattr(loader, name)!r}; restore with the same data settings")
        self._examples.set_state(state["examples"])
        self._num_batches = state["batches"]
        self._exhausted = self._summarised = False
        self.reports = {task: SplitReport.from_dict(task, counts) for task, counts in state["reports"].items()}

    def close(self):
        """Stops the reader threads."""
        self._examples.close()
