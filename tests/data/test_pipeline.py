"""grain pipelines: rows, padding and positions per mode, sharding, shuffling, restored state, skips, mixtures."""

import dataclasses
import json
import logging

import jax
import numpy as np
import pytest
from flax import nnx

from cpt_jax.data import pipeline, tasks
from cpt_jax.data.pipeline import Buckets, Loader, PromptBatch, SFTBatch
from cpt_jax.data.processor import ImageProcessor
from cpt_jax.data.prompts import encode_prompt, encode_sft_example
from cpt_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer, special_token_ids
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, get_rope_index, vision_inputs

# 28 px images become 2x2 patch grids (4 patches, 1 image token), 56 px ones 4x4 grids (16 patches, 4 tokens).
PROCESSOR = ImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
TEMPLATE = "no_cot"
# Rows hold 60-76 tokens; a row 0, 4 or 16 patches, and batches of up to 4 rows fit the patch buckets.
BUCKETS = Buckets(lengths=(64, 72, 80, 96), patches=(8, 16, 32, 64))
# task -> (train examples, image side); arithmetic is text-only.
TASKS = {"count": (12, 28), "digit": (9, 56), "arithmetic": (10, 28)}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def config(tokenizer):
    """A tiny model configuration whose special token ids are the tiny tokenizer's."""
    ids = special_token_ids(tokenizer)
    return Qwen2_5_VLConfig.from_hf({
        "model_type": "qwen2_5_vl",
        "image_token_id": ids["image_pad"], "video_token_id": ids["video_pad"],
        "vision_start_token_id": ids["vision_start"], "vision_end_token_id": ids["vision_end"],
        "text_config": {
            "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        },
        "vision_config": {
            "depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48, "out_hidden_size": 64,
            "fullatt_block_indexes": [1], "window_size": 112, "tokens_per_second": 2,
        },
    })


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    out = {}
    for task, (size, side) in TASKS.items():
        synthetic = tasks.SyntheticConfig(name=f"{task}_tiny", task=task, train_size=size, test_size=1,
                                          image_size=side)
        tasks.prepare("synthetic", data_dir, config=synthetic)
        out[task] = tasks.load_split("synthetic", "train", data_dir, config=synthetic)
    return out


@pytest.fixture(scope="module")
def examples(sources):
    """(task, id) -> example."""
    return {(task, example["id"]): example for task, source in sources.items() for example in source}


@pytest.fixture
def make(tokenizer, config):
    def make(sources, **kwargs):
        settings = dict(mode="sft", tokenizer=tokenizer, config=config, batch_size=2, buckets=BUCKETS,
                        processor=PROCESSOR, template=TEMPLATE, num_threads=2)
        return Loader(sources, **{**settings, **kwargs})
    return make


def row_keys(batch):
    """(task, id) of the batch's real rows."""
    return [(task, id_) for task, id_, valid in zip(batch.host.tasks, batch.host.ids, batch.device.valid) if valid]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert a.host.ids == b.host.ids and a.host.tasks == b.host.tasks
    np.testing.assert_array_equal(a.host.grid_thw, b.host.grid_thw)
    for x, y in zip(jax.tree.leaves(a.device), jax.tree.leaves(b.device), strict=True):
        np.testing.assert_array_equal(x, y)


def assert_vision_equal(vision, expected):
    for field in dataclasses.fields(expected):
        np.testing.assert_array_equal(getattr(vision, field.name), getattr(expected, field.name), err_msg=field.name)


@pytest.mark.parametrize("mode", ["sft", "prompt"])
def test_rows_are_the_examples_encoded_padded_to_buckets(mode, sources, examples, tokenizer, config, make):
    loader = make(sources, mode=mode, num_epochs=1)
    pad_id = special_token_ids(tokenizer)["pad"]
    shapes, seen = set(), []
    for batch in loader:
        device = batch.device
        assert isinstance(device, SFTBatch if mode == "sft" else PromptBatch)
        size, length = device.input_ids.shape
        assert size == 2 and length in BUCKETS.lengths
        pixel_rows = []
        for row in np.flatnonzero(device.valid):
            example = examples[batch.host.tasks[row], batch.host.ids[row]]
            assert batch.host.answers[row] == example["answer"]
            pixel_values, grid = PROCESSOR.preprocess_images(example["images"])
            pixel_rows.append(pixel_values)
            prompt_ids = encode_prompt(tokenizer, example["question"], grid, 2, TEMPLATE)
            ids = prompt_ids
            if mode == "sft":
                ids, _ = encode_sft_example(tokenizer, example["question"], example["answer"], grid, 2, TEMPLATE)
            n = len(ids)
            # SFT rows sit on the left of their padding, prompts on the right.
            at = np.arange(length) < n if mode == "sft" else np.arange(length) >= length - n
            np.testing.assert_array_equal(device.input_ids[row, at], ids)
            assert (device.input_ids[row, ~at] == pad_id).all()
            np.testing.assert_array_equal(device.attention_mask[row], at)
            positions, _ = get_rope_index(ids[None], grid, None, config)
            np.testing.assert_array_equal(device.position_ids[:, row, at], positions[:, 0])
            assert (device.position_ids[:, row, ~at] == 0).all()
            if mode == "sft":
                answer = at & (np.arange(length) >= len(prompt_ids))
                np.testing.assert_array_equal(device.loss_mask[row], answer)
                assert tokenizer.decode(device.input_ids[row, answer]) == example["answer"] + "<|im_end|>\n"
        # The whole padded batch at once gives the same positions.
        batch_positions, _ = get_rope_index(device.input_ids, batch.host.grid_thw, device.attention_mask, config)
        np.testing.assert_array_equal(device.position_ids, batch_positions)
        num_patches = sum(len(p) for p in pixel_rows)
        if num_patches == 0:
            assert device.vision is None and batch.host.grid_thw.shape == (0, 3)
        else:
            bucket = device.vision.pixel_values.shape[0]
            assert bucket in BUCKETS.patches and bucket == min(b for b in BUCKETS.patches if b >= num_patches)
            assert_vision_equal(device.vision, vision_inputs(np.concatenate(pixel_rows), batch.host.grid_thw,
                                                             config.vision, pad_to=bucket))
        shapes.add((length, None if device.vision is None else device.vision.pixel_values.shape[0]))
        seen += row_keys(batch)
    # A round-robin pass ends with its smallest task: 3 x 9 examples, none twice.
    assert len(set(seen)) == len(seen) == 27
    assert len(shapes) > 1


def test_text_only_batches_have_no_vision(sources, make):
    batch = next(iter(make({"arithmetic": sources["arithmetic"]})))
    assert batch.device.vision is None and batch.device.input_ids.shape[1] in BUCKETS.lengths


def test_shards_are_disjoint_cover_the_data_and_have_equal_batch_counts(sources, make):
    shards = [make({"digit": sources["digit"]}, num_epochs=1, shard_index=i, shard_count=2) for i in range(2)]
    assert [loader.num_batches for loader in shards] == [3, 3]  # 5 and 4 examples in batches of 2
    keys = []
    for loader in shards:
        batches = list(loader)
        assert len(batches) == 3
        keys.append({key for batch in batches for key in row_keys(batch)})
    assert len(keys[0]) == 5 and len(keys[1]) == 4
    assert not keys[0] & keys[1]
    assert keys[0] | keys[1] == {("digit", example["id"]) for example in sources["digit"]}

    mixed = [set().union(*map(row_keys, take(iter(make(sources, shard_index=i, shard_count=3)), 6)))
             for i in range(3)]
    assert not (mixed[0] & mixed[1] or mixed[1] & mixed[2] or mixed[0] & mixed[2])


def test_shuffle_is_deterministic_per_seed_and_differs_per_epoch(sources, make):
    def order(**kwargs):
        batches = list(make({"count": sources["count"]}, batch_size=4, num_epochs=2, **kwargs))
        assert len(batches) == 6
        keys = [key for batch in batches for key in row_keys(batch)]
        return keys[:12], keys[12:]

    first, second = order(seed=0)
    assert sorted(first) == sorted(second) == sorted(("count", e["id"]) for e in sources["count"])
    assert first != second
    assert order(seed=0) == (first, second)
    assert order(seed=1)[0] != first
    in_order = [("count", e["id"]) for e in sources["count"]]
    assert order(shuffle=False) == (in_order, in_order)


def test_restored_iterator_continues_at_the_same_example(sources, make):
    loader = make(sources, batch_size=4, seed=3)
    iterator = iter(loader)
    take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))
    # 9 more batches of 4 cross the end of every task's first epoch.
    expected = take(iterator, 9)
    restored = iter(loader)
    restored.set_state(state)
    for got, want in zip(take(restored, 9), expected, strict=True):
        assert_batches_equal(got, want)
    assert {task: r.total for task, r in restored.reports.items()} == {"count": 16, "digit": 16, "arithmetic": 16}

    with pytest.raises(ValueError, match="saved with seed=3 but this loader has seed=4"):
        iter(make(sources, batch_size=4, seed=4)).set_state(state)
    with pytest.raises(ValueError, match="saved with sizes=.* but this loader has sizes="):
        iter(make({"count": sources["count"]}, batch_size=4, seed=3)).set_state(state)


def test_final_partial_batch_is_filled_with_dummy_rows_or_dropped(sources, tokenizer, make):
    loader = make({"count": sources["count"]}, batch_size=5, num_epochs=1)
    batches = list(loader)
    assert loader.num_batches == len(batches) == 3
    last = batches[-1]
    np.testing.assert_array_equal(last.device.valid, [True, True, False, False, False])
    assert last.host.ids[2:] == last.host.answers[2:] == ["", "", ""]
    assert (last.device.input_ids[2:] == special_token_ids(tokenizer)["pad"]).all()
    for name in ("attention_mask", "loss_mask"):
        assert not getattr(last.device, name)[2:].any()
    assert not last.device.position_ids[:, 2:].any()

    dropping = make({"count": sources["count"]}, batch_size=5, num_epochs=1, drop_remainder=True)
    assert dropping.num_batches is None and len(list(dropping)) == 2


def test_mixture_follows_the_weights(sources, make):
    batches = take(iter(make(sources, batch_size=4, weights={"count": 2, "digit": 1, "arithmetic": 1})), 5)
    tasks_seen = [task for batch in batches for task in batch.host.tasks]
    assert [tasks_seen.count(task) for task in ("count", "digit", "arithmetic")] == [10, 5, 5]

    round_robin = [t for batch in take(iter(make(sources, batch_size=3)), 4) for t in batch.host.tasks]
    assert round_robin == ["count", "digit", "arithmetic"] * 4


def test_examples_no_bucket_holds_are_skipped_and_counted_or_raise_in_strict_mode(sources, make, caplog):
    rows = [dict(sources["count"][i]) for i in range(6)]
    rows[1]["question"] = "Look closely at the picture. " * 10 + rows[1]["question"]
    rows[4]["images"] = [np.zeros((56, 56, 3), np.uint8)]  # 16 patches > 8 // 2 per row
    buckets = Buckets(lengths=(80,), patches=(8,))
    with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
        iterator = iter(make({"count": rows}, buckets=buckets, num_epochs=1, shuffle=False))
        batches = list(iterator)
    kept = [key[1] for batch in batches for key in row_keys(batch)]
    assert kept == [rows[i]["id"] for i in (0, 2, 3, 5)]
    report = iterator.reports["count"]
    assert (report.total, report.kept, dict(report.skipped)) == (6, 4, {"too_long": 1, "too_many_patches": 1})
    warned = "\n".join(record.getMessage() for record in caplog.records)
    assert f"count example {rows[1]['id']!r}: it has" in warned and "> the largest length bucket 80" in warned
    assert f"count example {rows[4]['id']!r}: its images have 16 patches > 4" in warned
    assert "skipped 2 of 6: 1 too long, 1 too many image patches" in warned

    strict = make({"count": rows}, buckets=buckets, num_epochs=1, shuffle=False, strict=True)
    with pytest.raises(tasks.BadExampleError, match=rf"{rows[1]['id']!r}.*Fix: declare a larger length bucket"):
        list(strict)


def test_pad_gives_the_batch_of_larger_buckets(sources, config, make):
    for mode in ("sft", "prompt"):
        loader = make(sources, mode=mode, seed=5)
        batch = next(iter(loader))
        wide = next(iter(make(sources, mode=mode, seed=5, buckets=Buckets(lengths=(96,), patches=(64,)))))
        assert_batches_equal(loader.pad(batch, 96, 64), wide)
        assert loader.align(batch) is batch  # one process: nothing to agree on
        with pytest.raises(ValueError, match="padding only grows"):
            loader.pad(batch, 64, 64)

    text_only = make({"arithmetic": sources["arithmetic"]})
    padded = text_only.pad(next(iter(text_only)), 72, 8)
    empty = vision_inputs(np.zeros((0, config.vision.patch_dim), np.float32), np.zeros((0, 3)), config.vision,
                          pad_to=8)
    assert_vision_equal(padded.device.vision, empty)


def test_bad_settings_raise_naming_the_fix(sources, tokenizer, config, make):
    with pytest.raises(ValueError, match="unknown pipeline mode 'rl'"):
        make(sources, mode="rl")
    with pytest.raises(ValueError, match="one weight per task"):
        make(sources, weights={"count": 1})
    with pytest.raises(ValueError, match="shard_index=2 must lie in"):
        make(sources, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="fewer than the 10 shards"):
        make(sources, shard_index=0, shard_count=10)
    with pytest.raises(ValueError, match="not multiples of the merge unit 4"):
        make(sources, buckets=Buckets(lengths=(64,), patches=(6,)))
    with pytest.raises(ValueError, match="processor patch_size=16 differs"):
        make(sources, processor=ImageProcessor(patch_size=16))
    other = dataclasses.replace(config, image_token_id=config.image_token_id - 1)
    with pytest.raises(ValueError, match="config.image_token_id=.* but the tokenizer's image_pad id"):
        make(sources, config=other)
    with pytest.raises(ValueError, match="strictly increasing"):
        Buckets(lengths=(64, 32))


def test_model_gives_a_prompt_row_the_logits_of_its_example_alone(sources, examples, config, make):
    model = nnx.jit(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0)))()
    forward = jax.jit(lambda ids, mask, positions, vision: model(ids, mask, position_ids=positions, vision=vision))
    batch = next(iter(make(sources, mode="prompt")))
    device = batch.device
    assert device.vision is not None and device.valid.all()
    logits = forward(device.input_ids, device.attention_mask, device.position_ids, device.vision)
    # The second row's image tokens come after the first row's in the batch's flattened patches.
    row = 1
    real = device.attention_mask[row].astype(bool)
    ids = device.input_ids[row, real][None]
    pixel_values, grid = PROCESSOR.preprocess_images(examples[row_keys(batch)[row]]["images"])
    positions, _, vision = model.prepare(ids, pixel_values=pixel_values, image_grid_thw=grid)
    alone = forward(ids, np.ones_like(ids), positions, vision)
    np.testing.assert_allclose(logits[row, real], alone[0], rtol=1e-4, atol=1e-4)
