"""The demo in its smallest setting: every stage of the main job runs and writes the summary and the report."""

import json

import pytest

from cpt_jax import demo


def _smallest(config):
    config.data.tasks = config.data.tasks[:2]
    config.schedule.epochs = config.schedule.epochs[:2]
    config.data.general = config.data.general[:1]
    config.data.max_train_examples = 8
    config.data.max_eval_examples = 4
    config.sft.batch_size = 4
    config.rft.prompt_batch_size = 2
    config.rft.rollout_batches = 1
    config.rft.num_samples = 2
    config.rft.max_new_tokens = 4
    config.rft.micro_batches_per_update = 1
    config.rif.num_samples = 2
    config.eval.max_new_tokens = 4
    config.eval.batch_size = 4
    config.schedule.max_steps_per_task = 1
    config.diagnostics.gradient_every = 0


def test_demo_runs_end_to_end(tmp_path):
    summaries = demo.run(tmp_path, quick=True, seeds=2, pretrain_steps=2, adjust=_smallest)
    assert set(summaries) == set(demo.DEMO_METHODS)
    combined = json.loads((tmp_path / "summary.json").read_text())
    assert set(combined["methods"]) == set(demo.DEMO_METHODS)
    for method in demo.DEMO_METHODS:
        assert (tmp_path / method / "results" / "summary.json").exists()
    # The compared pair once more with training seed 1, from the same base model.
    assert set(combined["seeds"]) == {"1"} and set(combined["seeds"]["1"]) == set(demo.SEED_METHODS)
    for method in demo.SEED_METHODS:
        assert (tmp_path / "seeds" / "1" / method / "results" / "summary.json").exists()
    assert combined["seeds"]["1"]["sft"]["initial"] == combined["methods"]["sft"]["initial"]
    report = (tmp_path / "report.md").read_text()
    assert "sft" in report and "rft" in report and "forgot" in report
    assert "## Across training seeds" in report and "Over 2 training seeds" in report
    assert (tmp_path / "plots" / "accuracy_matrix.png").stat().st_size > 1000
    assert (tmp_path / "base" / "config.json").exists()  # the cached base model


def test_demo_needs_at_least_one_seed(tmp_path):
    with pytest.raises(ValueError, match="seeds=0 must be at least 1"):
        demo.run(tmp_path, seeds=0)
