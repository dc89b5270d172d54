"""Checkpoints with orbax: the train state (params, optimizer, step, rng) and the loop's JSON state together.

Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a run killed while
saving resumes from the previous complete checkpoint; the last `keep` checkpoints are kept.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from cpt_jax.train.state import TrainState


def _to_saveable(state: TrainState):
    # Typed PRNG keys are not an array type orbax writes; store the raw key data and re-wrap it on restore.
    return state.replace(rng=jax.random.key_data(state.rng))


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                 enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, loop: dict[str, Any], *, extra: dict | None = None):
        """Saves under `step` (a run-wide counter that only grows); `extra` holds further pytrees (e.g. reference
        parameters) restored with the same structure."""
        items = {"state": ocp.args.StandardSave(_to_saveable(state)), "loop": ocp.args.JsonSave(loop)}
        for name, tree in (extra or {}).items():
            items[name] = ocp.args.StandardSave(tree)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore(self, state_like: TrainState, *, extra_like: dict | None = None, step: int | None = None):
        """(state, loop, extra) of `step` (default the latest), with the structure and shardings of `state_like`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(state_like))
        items = {"state": ocp.args.StandardRestore(abstract), "loop": ocp.args.JsonRestore()}
        for name, tree in (extra_like or {}).items():
            items[name] = ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["state"]
        state = state.replace(rng=jax.random.wrap_key_data(state.rng))
        extra = {name: restored[name] for name in (extra_like or {})}
        return state, restored["loop"], extra

    def close(self):
        self.manager.close()
