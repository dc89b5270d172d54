"""What every task builder shares: reading a manual dir, validating examples, writing and reading array_record.

A builder reads the files a user placed in its manual dir: LLaMA-Factory annotations (`train.json`, `test.json`,
… with image paths relative to the manual dir) or Hugging Face parquet exports (`<split>-*.parquet` anywhere
below it, images as bytes inside). Every example becomes {id, question, answer, images}: the question holds one
"<image>" placeholder per image, images are stored encoded (PNG and JPEG bytes kept as they are, anything else
re-encoded as PNG). TFDS writes array_record shards without TensorFlow; `load_split` reads them back with images
decoded to uint8 RGB arrays.

An example that cannot be used (missing fields, empty answer, missing or unreadable image, extreme aspect ratio,
too long a prompt, …) is never kept: it is skipped with a warning naming it and counted in a per-split summary,
or, with `strict=True`, stops preparation with an error naming the example and the fix.
"""

import collections
import dataclasses
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import tensorflow_datasets as tfds

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
OPTION_LETTERS = "ABCDEFGHIJ"
SPLITS = ("train", "validation", "val", "dev", "testdev", "test")
LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."

FEATURES = tfds.features.FeaturesDict({
    "id": tfds.features.Text(),
    "question": tfds.features.Text(),
    "answer": tfds.features.Text(),
    # Encoded PNG/JPEG bytes; decoded by `load_split`, so neither writing nor reading needs TensorFlow.
    "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
})

# Why an example was skipped: (singular, plural) for the summary line.
SKIP_KINDS = {
    "missing_field": ("missing field", "missing fields"),
    "unsupported": ("unsupported record", "unsupported records"),
    "empty_answer": ("empty answer", "empty answers"),
    "duplicate_id": ("duplicate id", "duplicate ids"),
    "missing_image": ("missing image file", "missing image files"),
    "corrupt_image": ("corrupt image", "corrupt images"),
    "image_count": ("image count mismatch", "image count mismatches"),
    "aspect_ratio": ("extreme aspect ratio", "extreme aspect ratios"),
    "too_long": ("too long", "too long"),
    "too_many_patches": ("too many image patches", "too many image patches"),
}
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)
_KEPT_FORMATS = ("PNG", "JPEG")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds an example must meet to be kept.

    `max_prompt_tokens` needs `count_tokens` (text -> number of tokens, e.g. a tokenizer's length); the counts
    cover the question text, placeholders included, not the image tokens. None disables a bound.
    """

    max_prompt_chars: int | None = 16384
    max_prompt_tokens: int | None = None
    count_tokens: Callable[[str], int] | None = None
    max_aspect_ratio: float = 200.0

    def __post_init__(self):
        if self.max_prompt_tokens is not None and self.count_tokens is None:
            raise ValueError("max_prompt_tokens needs count_tokens (a function from text to its token count)")


class BadExampleError(ValueError):
    """A bad example met while preparing with `strict=True`."""


class Skip(Exception):
    """Raised by converters and checks: the example is unusable for reason `kind` (a key of SKIP_KINDS)."""

    def __init__(self, kind, message, fix):
        if kind not in SKIP_KINDS:
            raise ValueError(f"unknown skip kind {kind!r}; choose one of {sorted(SKIP_KINDS)}")
        super().__init__(message)
        self.kind, self.message, self.fix = kind, message, fix


@dataclasses.dataclass
class Example:
    """A converted example; `images` holds encoded bytes or paths (resolved against the manual dir)."""

    id: str
    question: str
    answer: str
    images: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SplitReport:
    """What preparing one split kept, excluded by the benchmark's definition, and skipped (by kind)."""

    split: str
    total: int = 0
    kept: int = 0
    excluded: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def summary(self):
        """E.g. "test: kept 598; skipped 3 of 601: 2 corrupt images, 1 too long"."""
        num_skipped = sum(self.skipped.values())
        line = f"{self.split}: kept {self.kept}; skipped {num_skipped} of {self.total}"
        if num_skipped:
            parts = [f"{count} {SKIP_KINDS[kind][count != 1]}" for kind, count in self.skipped.most_common()]
            line += ": " + ", ".join(parts)
        if self.excluded:
            line += f"; excluded {self.excluded} outside the benchmark"
        return line

    def as_dict(self):
        return {"total": self.total, "kept": self.kept, "excluded": self.excluded, "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, split, counts):
        skipped = collections.Counter(counts["skipped"])
        return cls(split, counts["total"], counts["kept"], counts["excluded"], skipped)


def field(row, name):
    """row[name], or a `Skip` naming the missing field."""
    value = row.get(name) if isinstance(row, Mapping) else None
    if value is None:
        raise Skip("missing_field", f"field {name!r} is missing", f"add {name!r} to the record or drop it")
    return value


def first_field(row, names):
    """The value of the first of `names` that `row` has, or a `Skip` listing them all."""
    for name in names:
        if isinstance(row, Mapping) and row.get(name) is not None:
            return row[name]
    raise Skip("missing_field", f"none of the fields {list(names)} is present", f"add one of {list(names)}")


def image_ref(value, name="image"):
    """An image cell of a parquet row (HF `{"bytes", "path"}` struct, raw bytes or a path) as bytes or path."""
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return value["path"]
        value = None
    if value is None:
        raise Skip("missing_field", f"{name} has neither bytes nor a path", f"export {name!r} with its bytes")
    return value


def with_placeholders(text, num_images):
    """`text` with one placeholder line per image in front, unless it places its placeholders itself."""
    if IMAGE_PLACEHOLDER in text:
        return text
    return f"{IMAGE_PLACEHOLDER}\n" * num_images + text


def lettered(options):
    """Multiple-choice options as lines "A. …", "B. …"."""
    if len(options) > len(OPTION_LETTERS):
        raise Skip("unsupported", f"{len(options)} options > {len(OPTION_LETTERS)}", "drop the example")
    return "\n".join(f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, options))


def option_letter(answer, num_options):
    """A multiple-choice answer given as a letter or a 0-based index, as its letter."""
    if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool) and 0 <= answer < num_options:
        return OPTION_LETTERS[answer]
    letter = answer.strip() if isinstance(answer, str) else ""
    if len(letter) == 1 and letter in OPTION_LETTERS[:num_options]:
        return letter
    raise Skip("missing_field", f"answer {answer!r} is not one of the {num_options} options",
               "give the answer as an option letter or index")


def majority(answers):
    """The most frequent of several reference answers (the first one met among ties)."""
    texts = [a["answer"] if isinstance(a, Mapping) else a for a in answers]
    texts = [str(t).strip() for t in texts if t is not None and str(t).strip()]
    if not texts:
        raise Skip("empty_answer", "all reference answers are empty", "drop the example")
    return collections.Counter(texts).most_common(1)[0][0]


def decode_image(data):
    """Encoded image bytes -> uint8 (H, W, 3) RGB; transparency is composited onto white (as transformers does)."""
    with PIL.Image.open(io.BytesIO(data)) as image:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))


def encode_png(image):
    """PNG bytes of a PIL image or a uint8 (H, W[, C]) array."""
    if not isinstance(image, PIL.Image.Image):
        image = PIL.Image.fromarray(np.asarray(image, np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def resolve_path(path, manual_dir):
    """The file `path` names, looked up under `manual_dir`.

    A path that does not exist as given is matched by its longest tail that exists under the manual dir, so
    annotations written on another machine (VizWiz's carry absolute paths) work once the images are copied in.
    """
    path = Path(path)
    if path.is_absolute() and path.is_file():
        return path
    parts = path.parts[1:] if path.is_absolute() else path.parts
    for start in range(len(parts)):
        candidate = manual_dir.joinpath(*parts[start:])
        if candidate.is_file():
            return candidate
    return None


def find_sources(manual_dir):
    """{split: ("json", [file]) or ("parquet", [files])} for the annotation files in `manual_dir`."""
    manual_dir = Path(manual_dir)
    sources = {}
    for split in SPLITS:
        json_file = manual_dir / f"{split}.json"
        parquet_files = sorted(manual_dir.rglob(f"{split}-*.parquet"))
        if json_file.is_file() and parquet_files:
            raise ValueError(
                f"{manual_dir} has both {json_file.name} and {split}-*.parquet files for split {split!r}; "
                "keep one of them"
            )
        if json_file.is_file():
            sources[split] = ("json", [json_file])
        elif parquet_files:
            sources[split] = ("parquet", parquet_files)
    if not sources:
        raise FileNotFoundError(
            f"no annotations in {manual_dir}: expected <split>.json (LLaMA-Factory format) or "
            f"<split>-*.parquet (Hugging Face export) files, with <split> one of {SPLITS}"
        )
    return sources


def _json_records(path):
    records = json.loads(Path(path).read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a {type(records).__name__}; LLaMA-Factory annotations are a JSON list")
    return records


def _parquet_rows(paths):
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            yield from batch.to_pylist()


def from_llamafactory(record, example_id):
    """A LLaMA-Factory record ({"messages": [user, assistant], "images": [...]}) as an `Example`."""
    messages = [m for m in field(record, "messages") if not (isinstance(m, Mapping) and m.get("role") == "system")]
    roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages]
    if roles != ["user", "assistant"]:
        if len(roles) > 2 and roles[:2] == ["user", "assistant"]:
            raise Skip("unsupported", f"{len(roles)}-message conversation; only one question and answer is "
                       "supported", "split it into single-turn records")
        raise Skip("missing_field", f"messages have roles {roles}; expected a user then an assistant message",
                   "give each record one user and one assistant message")
    question = field(messages[0], "content")
    answer = field(messages[1], "content")
    images = record.get("images") or []
    if not isinstance(images, list):
        raise Skip("missing_field", "'images' is not a list of paths", "write images as a list of paths")
    return Example(example_id, question, answer, list(images))


class TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the `cpt_*` builders: subclasses convert a parquet row with `from_row(row, example_id)`.

    `from_row` returns an `Example`, None for a row the benchmark leaves out by definition (counted as
    excluded), or raises `Skip`. `ID_FIELDS` name the row fields that hold an example id.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put LLaMA-Factory annotations (train.json, test.json; image paths relative to this directory) or the "
        "dataset's Hugging Face parquet files (<split>-*.parquet) in the manual dir."
    )
    HOMEPAGE = ""
    ID_FIELDS = ("id",)
    # Nothing is downloaded. Without this, tfds 4.9 looks for a checksums file next to the code, which on
    # Python >= 3.9 needs the undeclared `importlib_resources` backport.
    url_infos = None

    def __init__(self, *, strict=False, limits=Limits(), **kwargs):
        self.strict = strict
        self.limits = limits
        self.reports = {}
        self._manual_dir = None
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=FEATURES,
            homepage=self.HOMEPAGE,
            # Examples keep the order of the source files, so ids and evaluation order are reproducible.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def from_row(self, row, example_id):
        raise NotImplementedError(f"{type(self).__name__} cannot read parquet rows; give it LLaMA-Factory JSON")

    def _split_generators(self, dl_manager):
        self._manual_dir = Path(dl_manager.manual_dir)
        generators = {}
        for split, (fmt, files) in find_sources(self._manual_dir).items():
            if fmt == "json":
                generators[split] = self._generate_examples(split, _json_records(files[0]), from_llamafactory)
            else:
                generators[split] = self._generate_examples(split, _parquet_rows(files), self.from_row)
        return generators

    def _example_id(self, row, split, index):
        if isinstance(row, Mapping):
            for name in self.ID_FIELDS:
                if row.get(name) not in (None, ""):
                    return str(row[name])
        return f"{split}-{index}"

    def _generate_examples(self, split, rows, convert):
        report = SplitReport(split)
        seen_ids = set()
        for index, row in enumerate(rows):
            report.total += 1
            example_id = self._example_id(row, split, index)
            try:
                example = convert(row, example_id)
                if example is None:
                    report.excluded += 1
                    continue
                if example.id in seen_ids:
                    raise Skip("duplicate_id", "an earlier example has this id", "give each example its own id")
                features = self._validate(example)
            except Skip as skip:
                self._skip(report, example_id, skip)
                continue
            seen_ids.add(example.id)
            report.kept += 1
            yield index, features
        self._finish(report)

    def _skip(self, report, example_id, skip):
        where = f"{self.name} {report.split!r} example {example_id!r}"
        if self.strict:
            raise BadExampleError(
                f"{where}: {skip.message}. Fix: {skip.fix}; or prepare without strict to skip such examples"
            )
        report.skipped[skip.kind] += 1
        logger.warning("skipping %s: %s", where, skip.message)

    def _finish(self, report):
        self.reports[report.split] = report
        self.info.metadata[report.split] = report.as_dict()
        message = f"{self.name} {report.summary()}"
        if report.kept == 0:
            raise ValueError(
                f"{message}: nothing left to write; fix the data or remove the split's files from the manual dir"
            )
        (logger.warning if report.skipped else logger.info)(message)

    def _validate(self, example):
        """The features of a usable example, or a `Skip`."""
        question, answer = example.question, example.answer
        if not isinstance(question, str):
            raise Skip("unsupported", f"the question is a {type(question).__name__}, not text",
                       "write the question as one string with <image> placeholders")
        if not question.strip():
            raise Skip("missing_field", "the question is empty", "give the example a question")
        answer = str(answer)
        if not answer.strip():
            raise Skip("empty_answer", "the answer is empty", "give the example a reference answer or drop it")
        num_placeholders = question.count(IMAGE_PLACEHOLDER)
        if num_placeholders != len(example.images):
            raise Skip(
                "image_count",
                f"the question has {num_placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(example.images)} "
                "images",
                f"put exactly one {IMAGE_PLACEHOLDER} in the question per image",
            )
        self._check_length(question)
        images = [self._load_image(ref, i) for i, ref in enumerate(example.images)]
        return {"id": example.id, "question": question, "answer": answer.strip(), "images": images}

    def _check_length(self, question):
        limits = self.limits
        if limits.max_prompt_chars is not None and len(question) > limits.max_prompt_chars:
            raise Skip("too_long", f"the question has {len(question)} characters > {limits.max_prompt_chars}",
                       "raise the max prompt characters limit or shorten the question")
        if limits.max_prompt_tokens is not None:
            num_tokens = limits.count_tokens(question)
            if num_tokens > limits.max_prompt_tokens:
                raise Skip("too_long", f"the question has {num_tokens} tokens > {limits.max_prompt_tokens}",
                           "raise the max prompt tokens limit or shorten the question")

    def _load_image(self, ref, position):
        """Encoded bytes of a checked image; `ref` is bytes, a path, or a uint8 array."""
        what = f"image {position}"
        if isinstance(ref, np.ndarray):
            ref = encode_png(ref)
        elif isinstance(ref, (str, Path)):
            what = f"image {position} ({ref})"
            path = resolve_path(ref, self._manual_dir) if self._manual_dir is not None else None
            if path is None:
                raise Skip("missing_image", f"{what} not found under {self._manual_dir}",
                           "copy the image there (paths are relative to the manual dir) or fix the path")
            ref = path.read_bytes()
        if not isinstance(ref, bytes):
            raise Skip("missing_field", f"{what} is a {type(ref).__name__}, not image bytes or a path",
                       "store images as bytes or paths")
        try:
            with PIL.Image.open(io.BytesIO(ref)) as image:
                image.load()
                fmt, (width, height) = image.format, image.size
                converted = None if fmt in _KEPT_FORMATS else encode_png(_storable(image))
        except _UNREADABLE as error:
            raise Skip("corrupt_image", f"{what} cannot be decoded ({error})",
                       "re-export the image or drop the example") from None
        ratio = max(width, height) / max(1, min(width, height))
        if ratio > self.limits.max_aspect_ratio:
            raise Skip("aspect_ratio",
                       f"{what} is {width}x{height} (aspect ratio {ratio:.0f} > {self.limits.max_aspect_ratio:g})",
                       "crop or pad it to a less elongated shape, or drop it")
        return ref if converted is None else converted


def _storable(image):
    """`image` in a mode PNG can hold, keeping transparency."""
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return image
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    return image.convert("RGBA" if has_alpha else "RGB")


class ExampleSource(Sequence):
    """A prepared split as a random-access sequence of {"id", "question", "answer", "images"} dicts.

    Images come back as uint8 (H, W, 3) RGB arrays, decoded on access; grain reads it as a data source.
    """

    def __init__(self, data_source):
        self._data_source = data_source
        self._ids = None

    def __len__(self):
        return len(self._data_source)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a split of {len(self)} examples")
        record = self._data_source[index % len(self)]
        return {
            "id": record["id"].decode(),
            "question": record["question"].decode(),
            "answer": record["answer"].decode(),
            "images": [decode_image(data) for data in record["images"]],
        }

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def ids(self) -> list[str]:
        """Every example's id, without decoding images (read once: subsets and RIF ask for them repeatedly)."""
        if self._ids is None:
            self._ids = [self._data_source[i]["id"].decode() for i in range(len(self))]
        return list(self._ids)


class Subset(Sequence):
    """The examples of `source` at `indices`, in that order (a task limited to a size, or RIF's kept items)."""

    def __init__(self, source, indices):
        self.source = source
        self.indices = list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.source[self.indices[index]]

    def ids(self) -> list[str]:
        all_ids = self.source.ids()
        return [all_ids[i] for i in self.indices]
