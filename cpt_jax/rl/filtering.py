"""RIF-RFT: rollout-based instance filtering before RFT on a task.

Each training item is sampled `num_samples` times (T=1.0 by default); items with no correct rollout are dropped
(they would give an all-wrong group: zero reward variance, no learning signal, only KL pressure), and optionally
items that are always correct. The kept ids are stored in the workdir so a resumed run does not redo the pass.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterable, Sequence

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

RolloutFn = Callable[[Any], Sequence[Sequence[str]]]  # batch -> completions per prompt (num_samples each)
RewardFn = Callable[[Sequence[str], Sequence[str]], list[dict[str, float]]]


@dataclasses.dataclass
class FilterResult:
    kept_ids: list[str]
    total: int
    correct_counts: dict[str, int]
    num_samples: int

    @property
    def kept_fraction(self) -> float:
        return len(self.kept_ids) / self.total if self.total else 0.0

    def summary(self) -> str:
        always = sum(c == self.num_samples for c in self.correct_counts.values())
        never = sum(c == 0 for c in self.correct_counts.values())
        return (f"RIF kept {len(self.kept_ids)} of {self.total} items ({100 * self.kept_fraction:.1f}%): "
                f"{never} never correct, {always} always correct in {self.num_samples} rollouts")


def rif_filter(batches: Iterable[tuple[Sequence[str], Sequence[str], Any]], rollout_fn: RolloutFn,
               reward_fn: RewardFn, *, num_samples: int = 8, drop_always_correct: bool = False,
               state_path: str | os.PathLike | None = None, key: str = "", total: int | None = None) -> FilterResult:
    """Runs the filtering pass, or loads it from `state_path` when a pass with the same `key` is stored there.

    `batches` yields `(ids, ground_truths, batch)`; `rollout_fn(batch)` returns `num_samples` decoded completions
    per prompt; accuracy is the reward function's "accuracy" (1.0 = correct). Padding rows carry the id None.
    """
    if state_path is not None and os.path.exists(state_path):
        with open(state_path) as f:
            stored = json.load(f)
        if stored.get("key") == key and stored.get("num_samples") == num_samples and \
                stored.get("drop_always_correct") == drop_always_correct:
            log.info("RIF: reusing the stored pass in %s", state_path)
            return FilterResult(stored["kept_ids"], stored["total"], stored["correct_counts"], num_samples)
        log.warning("RIF: %s was made with other settings; running the filtering pass again", state_path)
    counts: dict[str, int] = {}
    order: list[str] = []
    with tqdm(total=total, desc="RIF filtering", unit="item") as bar:
        for ids, truths, batch in batches:
            completions = rollout_fn(batch)
            for item_id, truth, samples in zip(ids, truths, completions):
                if item_id is None:
                    continue
                if len(samples) != num_samples:
                    raise ValueError(f"rollout_fn returned {len(samples)} completions for item {item_id!r}, "
                                     f"expected num_samples={num_samples}")
                scores = reward_fn(list(samples), [truth] * num_samples)
                if item_id in counts:
                    raise ValueError(f"item id {item_id!r} appears twice in the filtering pass; ids must be unique")
                counts[item_id] = int(sum(s["accuracy"] >= 1.0 for s in scores))
                order.append(item_id)
                bar.update(1)
    kept = [i for i in order if counts[i] > 0 and not (drop_always_correct and counts[i] == num_samples)]
    result = FilterResult(kept, len(order), counts, num_samples)
    log.info(result.summary())
    if state_path is not None:
        _write_atomic(state_path, {"key": key, "num_samples": num_samples,
                                   "drop_always_correct": drop_always_correct, "kept_ids": kept,
                                   "total": len(order), "correct_counts": counts})
    return result


def _write_atomic(path, obj):
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)
