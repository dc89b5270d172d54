"""AdamW with learning-rate schedules, global-norm clipping and regex parameter groups.

Parameter groups are regular expressions matched (`re.fullmatch`) against '/'-joined nnx paths such as
`visual/blocks/attn/qkv/kernel` or `lm_head`:

  freeze        matching parameters get a zero update and keep no optimizer state (`r"visual/.*"` freezes the
                vision tower). Freezing wins over every other group.
  lr_scales     (regex, factor) pairs; the first matching regex scales that parameter's learning rate.
  weight_decay_exclude
                matching parameters get no weight decay (HF Trainer, used by LLaMA-Factory, excludes biases and
                norm scales: `(r".*/bias", r".*norm.*/scale")`).

The update of a trainable parameter p with gradient g is, in this order: clip g by the global norm of all trainable
gradients, Adam moments, `+ weight_decay * p`, `* -lr(step) * scale` — torch's AdamW with HF's schedules.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

FROZEN = "frozen"

ScheduleFn = Callable[[float, int, int], optax.Schedule]
SCHEDULES: dict[str, ScheduleFn] = {}


def register_schedule(name: str) -> Callable[[ScheduleFn], ScheduleFn]:
    """Decorator adding `make(peak_lr, warmup_steps, total_steps) -> schedule` to `SCHEDULES` under `name`."""

    def register(fn: ScheduleFn) -> ScheduleFn:
        if name in SCHEDULES:
            raise ValueError(f"schedule {name!r} is already registered; pick another name")
        SCHEDULES[name] = fn
        return fn

    return register


def _warmup(step, warmup_steps: int):
    # HF's warmup: the first update (step 0) uses lr 0 and step `warmup_steps` the peak.
    return jnp.minimum(1.0, step / max(1, warmup_steps)) if warmup_steps else 1.0


@register_schedule("constant")
def constant_schedule(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warmup, then constant (HF `constant_with_warmup`; plain constant without warmup)."""
    del total_steps
    return lambda step: peak * _warmup(jnp.asarray(step, jnp.float32), warmup_steps)


@register_schedule("cosine")
def cosine_schedule(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warmup, then half a cosine from the peak down to 0 at `total_steps` (HF `cosine`)."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        decay = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return peak * jnp.where(step < warmup_steps, _warmup(step, warmup_steps), decay)

    return schedule


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer hyper-parameters; the defaults are torch's AdamW and HF Trainer's clipping.

    `total_steps` is the number of updates the schedule spans (needed by "cosine" and by any warmup);
    `max_grad_norm <= 0` disables clipping.
    """

    learning_rate: float = 1e-5
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    total_steps: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    freeze: tuple[str, ...] = ()
    lr_scales: tuple[tuple[str, float], ...] = ()
    weight_decay_exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {sorted(SCHEDULES)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if (self.schedule != "constant" or self.warmup_ratio > 0) and self.total_steps <= 0:
            raise ValueError(f"schedule {self.schedule!r} with warmup_ratio={self.warmup_ratio} needs the number of "
                             f"updates: set total_steps > 0 (got {self.total_steps})")
        for pattern in (*self.freeze, *(p for p, _ in self.lr_scales), *self.weight_decay_exclude):
            re.compile(pattern)

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.total_steps)

    @classmethod
    def from_config(cls, config: Any) -> "OptimizerConfig":
        """From an `OptimizerConfig`, an ml_collections `ConfigDict`, a mapping or another dataclass."""
        if isinstance(config, cls):
            return config
        if dataclasses.is_dataclass(config):
            items = dataclasses.asdict(config)
        elif hasattr(config, "to_dict"):
            items = config.to_dict()
        elif isinstance(config, Mapping):
            items = dict(config)
        else:
            raise TypeError(f"optimizer config of type {type(config).__name__} is not a ConfigDict, mapping or "
                            "dataclass")
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(items) - known):
            raise ValueError(f"unknown optimizer config keys {unknown}; known keys: {sorted(known)}")
        for key in ("freeze", "weight_decay_exclude"):
            if key in items:
                items[key] = tuple(items[key])
        if "lr_scales" in items:
            items["lr_scales"] = tuple((str(p), float(s)) for p, s in items["lr_scales"])
        return cls(**items)


def _key_name(key):
    if isinstance(key, (jax.tree_util.DictKey, jax.tree_util.FlattenedIndexKey)):
        return key.key
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return key.idx
    return key


def path_str(path: Sequence[Any]) -> str:
    """'/'-joined parameter path from nnx path entries or jax key-path entries."""
    return "/".join(str(_key_name(key)) for key in path)


def map_paths(fn: Callable[[str], Any], params) -> Any:
    """A tree with `fn(path)` in place of every parameter (an nnx Variable or array), a prefix of `params`."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: fn(path_str(kp)), params,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))


def _matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    compiled = [re.compile(p) for p in patterns]
    return lambda path: any(r.fullmatch(path) for r in compiled)


def path_filter(patterns: Sequence[str]) -> Callable[[tuple, Any], bool]:
    """An nnx filter `(path, value) -> bool` selecting parameters whose '/'-joined path fully matches a pattern."""
    matches = _matcher(patterns)
    return lambda path, _: matches(path_str(path))


def _scale_label(scale: float) -> str:
    return f"lr_scale={scale!r}"


def _check_all_match(kind: str, patterns: Sequence[str], paths: list[str]):
    for pattern in patterns:
        if not any(re.fullmatch(pattern, p) for p in paths):
            shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
            raise ValueError(f"{kind} pattern {pattern!r} matches no parameter; patterns fully match '/'-joined "
                             f"paths such as {shown}")


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation plus what a train step needs besides it.

    `tx` updates the full parameter tree; `learning_rate(step)` is the base rate of update `step` (before group
    scales); `frozen` is an nnx filter of the frozen parameters, so steps can skip their gradients.
    """

    tx: optax.GradientTransformation
    learning_rate: optax.Schedule
    frozen: Callable[[tuple, Any], bool]


def make_optimizer(config) -> Optimizer:
    """AdamW with the configured schedule, clipping and parameter groups (see the module docstring).

    Raises ValueError at `tx.init` if a pattern of any group matches no parameter (a typo would silently train
    or decay what it meant to exclude).
    """
    config = OptimizerConfig.from_config(config)
    schedule = SCHEDULES[config.schedule](config.learning_rate, config.warmup_steps, config.total_steps)
    is_frozen = _matcher(config.freeze)
    scale_matchers = [(_matcher([p]), s) for p, s in config.lr_scales]
    no_decay = _matcher(config.weight_decay_exclude)
    scales = sorted({1.0, *(s for _, s in config.lr_scales)})

    def group(path: str) -> str:
        if is_frozen(path):
            return FROZEN
        return _scale_label(next((s for match, s in scale_matchers if match(path)), 1.0))

    def labels(params):
        paths = jax.tree.leaves(map_paths(lambda p: p, params))
        _check_all_match("freeze", config.freeze, paths)
        _check_all_match("lr_scales", [p for p, _ in config.lr_scales], paths)
        _check_all_match("weight_decay_exclude", config.weight_decay_exclude, paths)
        return map_paths(group, params)

    def adamw(scale: float) -> optax.GradientTransformation:
        return optax.chain(
            optax.scale_by_adam(config.b1, config.b2, config.eps),
            optax.add_decayed_weights(config.weight_decay, mask=lambda p: map_paths(lambda q: not no_decay(q), p)),
            optax.scale_by_learning_rate(lambda step: scale * schedule(step)),
        )

    transforms = {FROZEN: optax.set_to_zero(), **{_scale_label(s): adamw(s) for s in scales}}
    steps = []
    if config.max_grad_norm > 0:
        # Clip by the norm of the trainable gradients only: frozen ones never move anything.
        steps.append(optax.masked(optax.clip_by_global_norm(config.max_grad_norm),
                                  lambda p: map_paths(lambda q: not is_frozen(q), p)))
    steps.append(optax.multi_transform(transforms, labels))
    return Optimizer(tx=optax.chain(*steps), learning_rate=schedule, frozen=path_filter(config.freeze))
