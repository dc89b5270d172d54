"""One logging interface: TensorBoard event files (one run directory per stream) and a compact console line.

Only process 0 writes; other processes get a logger that does nothing, so call sites need no checks.
"""

from __future__ import annotations

import math
import os

import jax
from tqdm.auto import tqdm


class MetricLogger:
    def __init__(self, logdir: str | os.PathLike, *, enabled: bool | None = None):
        self.logdir = os.fspath(logdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._writers = {}

    def _writer(self, stream: str):
        if stream not in self._writers:
            from tensorboardX import SummaryWriter

            self._writers[stream] = SummaryWriter(os.path.join(self.logdir, stream))
        return self._writers[stream]

    def write(self, stream: str, step: int, scalars: dict[str, float]):
        """Scalars of one step to `logdir/stream` (e.g. "train", "eval", "diagnostics")."""
        if not self.enabled:
            return
        writer = self._writer(stream)
        for name, value in scalars.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(name, value, int(step))

    def console(self, stream: str, step: int, scalars: dict):
        """One line: `[train 120] loss 0.4321 | grad_norm 1.02 | ...`, printed above any progress bar."""
        if not self.enabled:
            return
        parts = [f"{k} {float(v):.4g}" for k, v in scalars.items()
                 if k != "finite" and getattr(v, "ndim", 0) == 0 and not isinstance(v, (list, str))]
        tqdm.write(f"[{stream} {int(step)}] " + " | ".join(parts))

    def close(self):
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
