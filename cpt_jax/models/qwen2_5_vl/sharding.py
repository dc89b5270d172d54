"""Logical axis rules of Qwen2.5-VL: logical axis name -> mesh axes, one parameter table per tower.

Layers name logical axes only: parameters through `out_sharding` metadata, activations through `constrain(x, names)`.
The tables here are the single place that maps those names onto the ('data', 'fsdp', 'tensor') mesh. A rule is a mesh
axis, a tuple of mesh axes, or None. A mesh axis that does not divide a dimension is dropped for that array (e.g. 2 KV
heads on a 4-way tensor axis are replicated), so any mesh size works for any checkpoint and any batch.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

Rule = str | tuple[str, ...] | None
Rules = Mapping[str, Rule]

TEXT_RULES: dict[str, Rule] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
}

VISION_RULES: dict[str, Rule] = {
    "layers": None,
    "vis_patch": None,
    "vis_embed": "fsdp",
    "vis_heads": "tensor",
    "vis_head_dim": None,
    "vis_mlp": "tensor",
    "vis_merge": "fsdp",
    "embed": None,
}

# Activations: the batch (and the flattened image patches) over both data-parallel axes, heads and the vocabulary
# over 'tensor'. The residual stream is not split along its width, so each layer's output is whole per row.
ACTIVATION_RULES: dict[str, Rule] = {
    "layers": None,
    "act_batch": ("data", "fsdp"),
    "act_length": None,
    "act_embed": None,
    "act_kv_length": None,
    "act_kv_heads": "tensor",
    "act_vocab": "tensor",
    "act_patches": ("data", "fsdp"),
    "act_vis_embed": None,
}

PARAM_RULES: dict[str, Rules] = {"text": TEXT_RULES, "vision": VISION_RULES}


def _as_tuple(rule: Rule) -> tuple[str, ...]:
    return () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)


def without_axis(tables: Mapping[str, Rules], axis: str) -> dict[str, dict[str, Rule]]:
    """`tables` with mesh axis `axis` removed from every rule (e.g. 'fsdp' for a tensor-parallel-only layout)."""

    def drop(rule: Rule) -> Rule:
        kept = tuple(a for a in _as_tuple(rule) if a != axis)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return {tower: {name: drop(rule) for name, rule in table.items()} for tower, table in tables.items()}


# The sampler keeps whole parameters along 'fsdp': decoding gathers every weight once per token, so an fsdp split
# would all-gather the model at every step. Devices along 'data' and 'fsdp' hold replicas and split the rows.
SAMPLER_RULES = without_axis(PARAM_RULES, "fsdp")


def _key_name(key) -> str | None:
    for attr in ("key", "name"):
        if isinstance(getattr(key, attr, None), str):
            return getattr(key, attr)
    return key if isinstance(key, str) else None


def rules_for(path: Sequence, tables: Mapping[str, Rules] = PARAM_RULES) -> Rules:
    """The table of the tower holding the parameter at `path` (nnx path or jax key path; any prefix, e.g. of an
    optimizer state, is allowed)."""
    return tables["vision" if "visual" in (_key_name(k) for k in path) else "text"]


def partition_spec(names, shape, mesh, rules: Rules) -> PartitionSpec:
    """PartitionSpec of an array of `shape` whose axes carry logical `names`, on `mesh` (a Mesh or AbstractMesh).

    Each logical axis takes the mesh axes of its rule that exist, are not used by an earlier axis, and keep the
    dimension divisible; the others are dropped for this array.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match an array of shape {tuple(shape)}")
    sizes = dict(mesh.shape)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule; add it to the sharding table")
        chosen, split = [], 1
        for axis in _as_tuple(rules[name]):
            n = sizes.get(axis, 1)
            if n > 1 and axis not in used and size % (split * n) == 0:
                chosen.append(axis)
                split *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def logical_to_mesh_sharding(var, mesh: jax.sharding.Mesh, tables: Mapping[str, Rules] = PARAM_RULES,
                             path: Sequence = ()) -> NamedSharding:
    """NamedSharding of one nnx Variable at `path` from its `out_sharding` logical names (replicated without)."""
    shape = var.get_value().shape
    names = var.get_metadata().get("out_sharding") or (None,) * len(shape)
    return NamedSharding(mesh, partition_spec(names, shape, mesh, rules_for(path, tables)))


# --- activation constraints ------------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[jax.sharding.Mesh, Rules] | None] = contextvars.ContextVar(
    "activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh: jax.sharding.Mesh, rules: Rules = ACTIVATION_RULES):
    """Within this context, `constrain` pins activations to `mesh` by `rules`; traced code reads it.

    The context also sets `mesh` as JAX's current mesh, which is part of jit's cache key, so a function traced
    inside the context is never reused outside it (or under another mesh) without its constraints.
    """
    token = _ACTIVE.set((mesh, rules))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names) -> jax.Array:
    """`x` constrained to the sharding of its logical axis `names` under `activation_rules`; `x` itself otherwise."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, partition_spec(names, x.shape, mesh, rules)))
