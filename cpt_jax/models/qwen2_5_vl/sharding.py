"""Logical axis rules of Qwen2.5-VL, one table per tower: logical parameter axis -> mesh axis (or None).

Layers name logical axes only (`out_sharding` metadata on every parameter); these tables are the single place that maps
them onto the ('data', 'fsdp', 'tensor') mesh. A mesh axis that does not divide a dimension is dropped for that
parameter (e.g. 2 KV heads on a 4-way tensor axis are replicated), so any mesh size works for any checkpoint.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

TEXT_RULES: dict[str, str | None] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
}

VISION_RULES: dict[str, str | None] = {
    "layers": None,
    "vis_patch": None,
    "vis_embed": "fsdp",
    "vis_heads": "tensor",
    "vis_head_dim": None,
    "vis_mlp": "tensor",
    "vis_merge": "fsdp",
    "embed": None,
}


def rules_for(path: tuple) -> dict[str, str | None]:
    return VISION_RULES if path and path[0] == "visual" else TEXT_RULES


def partition_spec(names, shape, mesh: jax.sharding.Mesh, rules: dict[str, str | None]) -> PartitionSpec:
    axes = []
    for name, size in zip(names, shape):
        axis = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule; add it to the sharding table")
        usable = axis is not None and axis in mesh.shape and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0
        axes.append(axis if usable and axis not in axes else None)
    return PartitionSpec(*axes)


def logical_to_mesh_sharding(var, mesh: jax.sharding.Mesh, rules=None, path: tuple = ()) -> NamedSharding:
    """NamedSharding of one nnx Variable from its `out_sharding` logical names."""
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.get_value().shape)
    return NamedSharding(mesh, partition_spec(names, var.get_value().shape, mesh, rules or rules_for(path)))
