import json

import pytest

from cpt_jax.rl.filtering import rif_filter
from cpt_jax.rl.rewards import get_reward_fn

GOOD, BAD = "<think>ok</think> \\boxed{4}", "<think>ok</think> \\boxed{5}"


def _batches():
    # item a: never correct, b: sometimes, c: always; a padding row (id None) must be ignored.
    yield ["a", "b"], ["4", "4"], [[BAD] * 4, [GOOD, BAD, BAD, GOOD]]
    yield ["c", None], ["4", "4"], [[GOOD] * 4, [GOOD] * 4]


def _rollout(batch):
    return batch


def test_keeps_items_with_at_least_one_correct_rollout(tmp_path):
    result = rif_filter(_batches(), _rollout, get_reward_fn("math"), num_samples=4)
    assert result.kept_ids == ["b", "c"]
    assert result.correct_counts == {"a": 0, "b": 2, "c": 4}
    assert result.total == 3 and result.kept_fraction == pytest.approx(2 / 3)
    assert "kept 2 of 3" in result.summary()


def test_can_also_drop_always_correct_items():
    result = rif_filter(_batches(), _rollout, get_reward_fn("math"), num_samples=4, drop_always_correct=True)
    assert result.kept_ids == ["b"]


def test_stored_pass_is_reused_and_settings_change_reruns(tmp_path):
    path = tmp_path / "rif" / "task0.json"
    first = rif_filter(_batches(), _rollout, get_reward_fn("math"), num_samples=4, state_path=path, key="t0")
    assert json.loads(path.read_text())["kept_ids"] == first.kept_ids

    def must_not_run(batch):
        raise AssertionError("the stored pass should have been reused")

    again = rif_filter(_batches(), must_not_run, get_reward_fn("math"), num_samples=4, state_path=path, key="t0")
    assert again.kept_ids == first.kept_ids
    rerun = rif_filter(_batches(), _rollout, get_reward_fn("math"), num_samples=4, state_path=path, key="t0",
                       drop_always_correct=True)
    assert rerun.kept_ids == ["b"]


def test_wrong_number_of_samples_is_an_error():
    with pytest.raises(ValueError, match="num_samples=8"):
        rif_filter(_batches(), _rollout, get_reward_fn("math"), num_samples=8)
