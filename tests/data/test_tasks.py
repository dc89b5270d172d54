import io
import json
import logging

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpt_jax import cli
from cpt_jax.data import synthetic, tasks
from cpt_jax.data.tasks import base

_RNG = np.random.default_rng(0)
PIXELS = _RNG.integers(0, 256, size=(12, 18, 3), dtype=np.uint8)
PIXELS_2 = _RNG.integers(0, 256, size=(10, 10, 3), dtype=np.uint8)
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def _encode(array, fmt="PNG"):
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


PNG, PNG_2 = _encode(PIXELS), _encode(PIXELS_2)


def _hf_image(data):
    return {"bytes": data, "path": "x.png"}


# builder -> (a parquet row in the layout of the dataset's Hugging Face export, expected question, answer, images)
PARQUET_CASES = {
    "cpt_scienceqa": (
        {"image": _hf_image(PNG), "question": "Which is a mammal?", "choices": ["cat", "fish"], "answer": 0,
         "hint": "Look closely."},
        f"<image>\nLook closely.\nWhich is a mammal?\nA. cat\nB. fish\n{LETTER}", "A", [PIXELS],
    ),
    "cpt_textvqa": (
        {"image": _hf_image(PNG), "question": "what brand?", "answers": ["dakota", "kodak", "dakota"],
         "ocr_tokens": ["DAKOTA", "cam"], "question_id": 7},
        f"<image>\nwhat brand?\nReference OCR token:DAKOTA,cam\n{SHORT}", "dakota", [PIXELS],
    ),
    "cpt_vizwiz": (
        {"image": _hf_image(PNG), "question": "what is this?",
         "answers": [{"answer": "unanswerable"}, {"answer": "soup"}, {"answer": "soup"}]},
        "<image>\nwhat is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        f"{SHORT}", "soup", [PIXELS],
    ),
    "cpt_gqa": (
        {"image": _hf_image(PNG), "question": "Is the cup red?", "answer": "no", "id": "g1"},
        f"<image>\nIs the cup red?\n{SHORT}", "no", [PIXELS],
    ),
    "cpt_geometry3k": (
        {"images": [_hf_image(PNG)], "problem": "<image>Find x.", "answer": "3\\sqrt{2}"},
        "<image>Find x.", "3\\sqrt{2}", [PIXELS],
    ),
    "cpt_pathvqa": (
        {"image": _hf_image(PNG), "question": "is this tissue inflamed?", "answer": "yes"},
        f"<image>is this tissue inflamed?\n{SHORT}", "yes", [PIXELS],
    ),
    "cpt_superclevr": (
        {"image": _hf_image(PNG), "problem": "How many cars are there?", "solution": "<answer> 3 </answer>"},
        f"<image>\nHow many cars are there?\n{SHORT}", "3", [PIXELS],
    ),
    "cpt_mmmu": (
        {"id": "validation_Art_1", "question": "Is <image 2> older than <image 1>?", "options": "['yes', 'no']",
         "answer": "B", "question_type": "multiple-choice", "image_1": _hf_image(PNG), "image_2": _hf_image(PNG_2),
         "image_3": None},
        f"Is <image> older than <image>?\nA. yes\nB. no\n{LETTER}", "B", [PIXELS_2, PIXELS],
    ),
    "cpt_mmlu_pro": (
        {"question_id": 5, "question": "What is 2 + 2?", "options": [str(i) for i in range(10)], "answer": "E",
         "answer_index": 4},
        "What is 2 + 2?\n" + "\n".join(f"{'ABCDEFGHIJ'[i]}. {i}" for i in range(10)) + f"\n{LETTER}", "E", [],
    ),
    "cpt_pope": (
        {"question_id": "p1", "question": "Is there a dog in the image?", "answer": "yes", "image": _hf_image(PNG)},
        f"<image>\nIs there a dog in the image?\n{SHORT}", "yes", [PIXELS],
    ),
}
FILE_BUILDERS = sorted(PARQUET_CASES)


def _write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _record(question, answer, images=(), **extra):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "images": list(images), **extra}


def _write_json(manual_dir, split, records):
    manual_dir.mkdir(parents=True, exist_ok=True)
    (manual_dir / f"{split}.json").write_text(json.dumps(records))


@pytest.fixture(scope="module")
def llamafactory_dir(tmp_path_factory):
    manual_dir = tmp_path_factory.mktemp("llamafactory")
    (manual_dir / "imgs").mkdir()
    (manual_dir / "imgs" / "a.png").write_bytes(PNG)
    (manual_dir / "imgs" / "b.jpg").write_bytes(_encode(PIXELS_2, "JPEG"))
    _write_json(manual_dir, "test", [
        _record("<image>\nWhat colour?\nAnswer briefly.", "red", ["imgs/a.png"]),
        _record("What is 3 + 4?", "7"),
        {"id": "two-images", "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "<image><image>Same?"},
            {"role": "assistant", "content": "no"}], "images": ["imgs/a.png", "imgs/b.jpg"]},
    ])
    _write_json(manual_dir, "train", [_record("<image>\nShape?", "circle", ["imgs/a.png"])])
    return manual_dir


@pytest.mark.parametrize("name", FILE_BUILDERS)
def test_parquet_export_round_trips(tmp_path, name):
    row, question, answer, images = PARQUET_CASES[name]
    _write_parquet(tmp_path / "raw" / "data" / "test-00000-of-00001.parquet", [row])
    reports = tasks.prepare(name, tmp_path / "tfds", tmp_path / "raw")
    assert reports["test"].kept == 1 and not reports["test"].skipped

    (example,) = list(tasks.load_split(name, "test", tmp_path / "tfds"))
    assert example["question"] == question
    assert example["answer"] == answer
    assert len(example["images"]) == len(images)
    for decoded, pixels in zip(example["images"], images):
        np.testing.assert_array_equal(decoded, pixels)


def test_scienceqa_keeps_questions_with_an_image_and_mmmu_open_questions_get_text_answers(tmp_path):
    row = PARQUET_CASES["cpt_scienceqa"][0]
    _write_parquet(tmp_path / "sqa" / "test-00000-of-00001.parquet", [{**row, "image": None}, row])
    report = tasks.prepare("scienceqa", tmp_path / "tfds", tmp_path / "sqa")["test"]
    assert (report.total, report.kept, report.excluded) == (2, 1, 1)
    assert report.summary() == "test: kept 1; skipped 0 of 2; excluded 1 outside the benchmark"

    row = {**PARQUET_CASES["cpt_mmmu"][0], "question": "How many <image 1> apples?", "options": "[]",
           "answer": "4", "question_type": "open"}
    _write_parquet(tmp_path / "mmmu" / "Art" / "validation-00000-of-00001.parquet", [row])
    tasks.prepare("mmmu", tmp_path / "tfds", tmp_path / "mmmu")
    (example,) = list(tasks.load_split("mmmu", "validation", tmp_path / "tfds"))
    assert (example["question"], example["answer"]) == (f"How many <image> apples?\n{SHORT}", "4")


@pytest.mark.parametrize("name", FILE_BUILDERS)
def test_llamafactory_annotations_round_trip(tmp_path, llamafactory_dir, name):
    reports = tasks.prepare(name, tmp_path, llamafactory_dir)
    assert {split: r.kept for split, r in reports.items()} == {"test": 3, "train": 1}

    examples = tasks.load_split(name, "test", tmp_path)
    assert [e["id"] for e in examples] == ["test-0", "test-1", "two-images"]
    assert [(e["question"], e["answer"]) for e in examples] == [
        ("<image>\nWhat colour?\nAnswer briefly.", "red"), ("What is 3 + 4?", "7"), ("<image><image>Same?", "no")]
    np.testing.assert_array_equal(examples[0]["images"][0], PIXELS)
    assert examples[1]["images"] == []
    first, jpeg = examples[2]["images"]
    np.testing.assert_array_equal(first, PIXELS)
    # JPEG bytes are stored as they are, so they decode exactly as the source file does.
    source_jpeg = np.asarray(PIL.Image.open(llamafactory_dir / "imgs" / "b.jpg").convert("RGB"))
    np.testing.assert_array_equal(jpeg, source_jpeg)


def _bad_inputs_dir(root):
    """A manual dir with two good examples and one of each kind of bad example, keyed by its id."""
    (root / "img").mkdir(parents=True)
    (root / "img" / "ok.png").write_bytes(PNG)
    (root / "img" / "truncated.png").write_bytes(PNG[: len(PNG) // 2])
    (root / "img" / "garbage.jpg").write_bytes(b"not an image at all")
    (root / "img" / "thin.png").write_bytes(_encode(np.zeros((1, 250, 3), np.uint8)))
    good = "<image>\nWhat is shown?"
    records = [
        _record(good, "a cat", ["img/ok.png"], id="good-1"),
        _record(good, "truncated", ["img/truncated.png"], id="truncated"),
        _record(good, "garbage", ["img/garbage.jpg"], id="garbage"),
        _record(good, "missing", ["img/nowhere.png"], id="missing-file"),
        {"id": "no-messages", "images": ["img/ok.png"]},
        _record(good, "  ", ["img/ok.png"], id="empty-answer"),
        _record(good, "thin", ["img/thin.png"], id="thin"),
        _record("<image>\n" + "why? " * 100, "long", ["img/ok.png"], id="too-long"),
        _record(good, "no image", [], id="placeholder-without-image"),
        {"id": "multi-turn", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                                          {"role": "user", "content": "and?"}, {"role": "assistant", "content": "b"}]},
        _record(good, "again", ["img/ok.png"], id="good-1"),
        _record("What is 1 + 1?", "2", id="good-2"),
    ]
    _write_json(root, "test", records)
    return root


BAD_KINDS = {
    "truncated": "corrupt_image", "garbage": "corrupt_image", "missing-file": "missing_image",
    "no-messages": "missing_field", "empty-answer": "empty_answer", "thin": "aspect_ratio", "too-long": "too_long",
    "placeholder-without-image": "image_count", "multi-turn": "unsupported", "good-1": "duplicate_id",
}
LIMITS = base.Limits(max_prompt_chars=200)


def test_bad_examples_are_skipped_counted_and_named(tmp_path, caplog):
    manual_dir = _bad_inputs_dir(tmp_path / "raw")
    with caplog.at_level(logging.WARNING, logger=base.__name__):
        reports = tasks.prepare("textvqa", tmp_path / "tfds", manual_dir, limits=LIMITS)

    report = reports["test"]
    assert (report.total, report.kept) == (12, 2)
    assert dict(report.skipped) == {"corrupt_image": 2, "missing_image": 1, "missing_field": 1, "empty_answer": 1,
                                    "aspect_ratio": 1, "too_long": 1, "image_count": 1, "unsupported": 1,
                                    "duplicate_id": 1}
    assert report.summary() == (
        "test: kept 2; skipped 10 of 12: 2 corrupt images, 1 missing image file, 1 missing field, 1 empty answer, "
        "1 extreme aspect ratio, 1 too long, 1 image count mismatch, 1 unsupported record, 1 duplicate id")
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for example_id in BAD_KINDS:
        assert f"example {example_id!r}" in warned
    assert "skipped 10 of 12" in warned

    examples = tasks.load_split("textvqa", "test", tmp_path / "tfds")
    assert [(e["id"], e["answer"]) for e in examples] == [("good-1", "a cat"), ("good-2", "2")]
    recorded = tasks.get_builder("textvqa", tmp_path / "tfds").info.metadata["test"]
    assert recorded["skipped"] == dict(report.skipped)


@pytest.mark.parametrize("bad_id", sorted(BAD_KINDS))
def test_strict_raises_naming_the_example_and_the_fix(tmp_path, bad_id):
    manual_dir = _bad_inputs_dir(tmp_path / "raw")
    records = json.loads((manual_dir / "test.json").read_text())
    keep = [r for r in records if r.get("id") == bad_id]
    if bad_id != "good-1":
        keep = [records[0]] + keep
    _write_json(manual_dir, "test", keep)
    with pytest.raises(base.BadExampleError, match=rf"'{bad_id}'.*Fix: ") as error:
        tasks.prepare("textvqa", tmp_path / "tfds", manual_dir, strict=True, limits=LIMITS)
    assert str(error.value).startswith("cpt_textvqa 'test' example")


def test_bad_parquet_rows_are_skipped(tmp_path):
    row = PARQUET_CASES["cpt_pope"][0]
    rows = [row, {**row, "question_id": "no-image", "image": None},
            {**row, "question_id": "cut", "image": _hf_image(PNG[:40])}, {**row, "question_id": "blank", "answer": ""}]
    _write_parquet(tmp_path / "raw" / "test-00000-of-00001.parquet", rows)
    report = tasks.prepare("pope", tmp_path / "tfds", tmp_path / "raw")["test"]
    assert report.kept == 1
    assert dict(report.skipped) == {"missing_field": 1, "corrupt_image": 1, "empty_answer": 1}


def test_token_limit_uses_the_given_counter(tmp_path):
    _write_json(tmp_path / "raw", "test", [_record("one two three", "a"), _record("one two three four five", "b")])
    limits = base.Limits(max_prompt_tokens=3, count_tokens=lambda text: len(text.split()))
    report = tasks.prepare("mmlu_pro", tmp_path / "tfds", tmp_path / "raw", limits=limits)["test"]
    assert (report.kept, dict(report.skipped)) == (1, {"too_long": 1})
    with pytest.raises(ValueError, match="count_tokens"):
        base.Limits(max_prompt_tokens=3)


def test_a_split_with_nothing_usable_is_an_error(tmp_path):
    _write_json(tmp_path / "raw", "test", [_record("q", "")])
    with pytest.raises(ValueError, match="skipped 1 of 1: 1 empty answer: nothing left"):
        tasks.prepare("pope", tmp_path / "tfds", tmp_path / "raw")


def test_images_are_stored_losslessly_and_decoded_to_rgb(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    palette = PIL.Image.fromarray(PIXELS).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=8)
    gif = io.BytesIO()
    palette.save(gif, format="GIF")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "rgba.png").write_bytes(_encode(rgba))
    (tmp_path / "raw" / "palette.gif").write_bytes(gif.getvalue())
    _write_json(tmp_path / "raw", "test", [_record("<image><image>?", "x", ["rgba.png", "palette.gif"])])
    tasks.prepare("gqa", tmp_path / "tfds", tmp_path / "raw")

    (example,) = list(tasks.load_split("gqa", "test", tmp_path / "tfds"))
    composited, from_gif = example["images"]
    # Red 200 at alpha 128/255 over white, as transformers converts RGBA: (200*128 + 255*127) / 255 = 227.4.
    np.testing.assert_array_equal(composited, np.broadcast_to([227, 127, 127], (4, 4, 3)))
    np.testing.assert_array_equal(from_gif, np.asarray(palette.convert("RGB")))


def test_paths_from_another_machine_resolve_by_their_tail(tmp_path):
    (tmp_path / "VizWiz" / "val").mkdir(parents=True)
    (tmp_path / "VizWiz" / "val" / "x.jpg").write_bytes(PNG)
    found = base.resolve_path("/home/someone/project/tasks/VizWiz/val/x.jpg", tmp_path)
    assert found == tmp_path / "VizWiz" / "val" / "x.jpg"
    assert base.resolve_path("/home/someone/VizWiz/val/y.jpg", tmp_path) is None


def test_manual_dir_problems_are_explained(tmp_path):
    _write_json(tmp_path / "both", "test", [])
    _write_parquet(tmp_path / "both" / "test-00000-of-00001.parquet", [{"a": 1}])
    with pytest.raises(ValueError, match="both test.json and test-"):
        base.find_sources(tmp_path / "both")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no annotations"):
        base.find_sources(tmp_path / "other")


def test_synthetic_builder_writes_what_the_generator_gives(tmp_path):
    config = tasks.SyntheticConfig(name="count_tiny", task="count", train_size=5, test_size=3, image_size=28)
    reports = tasks.prepare("synthetic", tmp_path, config=config)
    assert (reports["train"].kept, reports["test"].kept) == (5, 3)

    examples = tasks.load_split("synthetic", "test", tmp_path, config=config)
    for example, expected in zip(examples, synthetic.generate("count", "test", 3, image_size=28), strict=True):
        assert (example["id"], example["question"], example["answer"]) == (
            expected["id"], expected["question"], expected["answer"])
        np.testing.assert_array_equal(example["images"][0], expected["image"])


def test_synthetic_builder_passes_the_layout_on(tmp_path):
    config = tasks.SyntheticConfig(name="shape_tiny_single", task="shape", train_size=2, test_size=2,
                                   layout=synthetic.SINGLE)
    tasks.prepare("synthetic", tmp_path, config=config)
    examples = tasks.load_split("synthetic", "train", tmp_path, config=config)
    expected = synthetic.generate("shape", "train", 2, layout=synthetic.SINGLE)
    for example, want in zip(examples, expected, strict=True):
        assert example["answer"] == want["answer"]
        np.testing.assert_array_equal(example["images"][0], want["image"])
    # The shipped single-shape configs are named after their task.
    builder = tasks.get_builder("synthetic/colour_single", tmp_path)
    assert builder.builder_config.layout == synthetic.SINGLE


def test_prepared_dataset_is_reused_unless_overwritten(tmp_path, llamafactory_dir):
    assert tasks.prepare("pope", tmp_path, llamafactory_dir)
    assert tasks.prepare("pope", tmp_path, llamafactory_dir) == {}
    assert tasks.prepare("pope", tmp_path, llamafactory_dir, overwrite=True)["test"].kept == 3


def test_reader_is_a_random_access_source(tmp_path, llamafactory_dir):
    import grain

    tasks.prepare("pope", tmp_path, llamafactory_dir)
    examples = tasks.load_split("pope", "test", tmp_path)
    assert len(examples) == 3 and examples[-1]["id"] == "two-images"
    with pytest.raises(IndexError):
        examples[3]
    dataset = grain.MapDataset.source(examples).map(lambda e: e["answer"])
    assert list(dataset) == ["red", "7", "no"]


def test_names_and_errors(tmp_path):
    assert tasks.get_builder("scienceqa", tmp_path).name == "cpt_scienceqa"
    assert tasks.expand("synthetic") == [f"cpt_synthetic/{name}" for name in synthetic.TASKS] + [
        f"cpt_synthetic/{name}_single" for name in synthetic.SINGLE_TASKS]
    assert tasks.expand("cpt_pope") == ["cpt_pope"]
    with pytest.raises(KeyError, match="unknown dataset 'coco'"):
        tasks.get_builder("coco", tmp_path)
    with pytest.raises(KeyError, match="needs a config"):
        tasks.get_builder("synthetic", tmp_path)
    with pytest.raises(FileNotFoundError, match="cpt-jax data prepare --dataset pope --manual-dir"):
        tasks.load_split("pope", "test", tmp_path)


def test_cli_prepare_and_show(tmp_path, llamafactory_dir, capsys):
    data_dir = str(tmp_path)
    assert cli.main(["data", "prepare", "--dataset", "vizwiz", "--manual-dir", str(llamafactory_dir),
                     "--data-dir", data_dir]) == 0
    assert "cpt_vizwiz test: kept 3; skipped 0 of 3" in capsys.readouterr().out

    assert cli.main(["data", "show", "--dataset", "vizwiz", "--data-dir", data_dir, "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert "vizwiz test: 3 examples" in out
    assert "id: test-0\nquestion: <image>\nWhat colour?\nAnswer briefly.\nanswer: red\nimages: 12x18x3" in out
    assert "images: none" in out and "images: 12x18x3, 10x10x3" in out

    with pytest.raises(SystemExit, match="has no split 'dev'"):
        cli.main(["data", "show", "--dataset", "vizwiz", "--data-dir", data_dir, "--split", "dev"])
    with pytest.raises(SystemExit, match="pass --manual-dir"):
        cli.main(["data", "prepare", "--dataset", "pope", "--data-dir", data_dir])


def test_cli_counts_tokens_with_a_tokenizer(tmp_path, capsys):
    import tokenizers
    import transformers

    # A whitespace word-level tokenizer: one token per word.
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]").save_pretrained(
        tmp_path / "tokenizer")
    _write_json(tmp_path / "raw", "test", [_record("one two three", "a"), _record("one two three four", "b")])
    argv = ["data", "prepare", "--dataset", "mmlu_pro", "--manual-dir", str(tmp_path / "raw"), "--data-dir",
            str(tmp_path / "tfds"), "--max-prompt-tokens", "3"]
    with pytest.raises(SystemExit, match="needs --tokenizer"):
        cli.main(argv)
    assert cli.main(argv + ["--tokenizer", str(tmp_path / "tokenizer")]) == 0
    assert "cpt_mmlu_pro test: kept 1; skipped 1 of 2: 1 too long" in capsys.readouterr().out
