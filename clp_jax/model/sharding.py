"""One logical-axis rules table, mesh construction, and NamedShardings for parameter trees.

Parameters name their dimensions with logical axes (`logical_axes` metadata, see layers.logical);
`RULES` maps each logical axis to a mesh axis (or None = replicated). The mesh has the named axes
`data` and `model`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

RULES: dict[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "embed": None,
    "q_heads": None,  # 14 query heads (0.5B) do not divide 4 or 8: keep the trunk replicated by default
    "kv_heads": None,
    "head_dim": None,
    "mlp": "model",
    "heads": None,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    data: int = 1
    model: int = 1

    def make(self, devices=None) -> Mesh:
        devices = np.asarray(devices if devices is not None else jax.devices())
        n = self.data * self.model
        if n > devices.size:
            raise ValueError(f"Mesh data={self.data} x model={self.model} needs {n} devices; "
                             f"{devices.size} are available.")
        return Mesh(devices[:n].reshape(self.data, self.model), ("data", "model"))


def spec(logical_axes, rules=RULES) -> P:
    """PartitionSpec for a tuple of logical axis names (None entries stay replicated)."""
    mesh_axes = [rules.get(a) if a is not None else None for a in logical_axes]
    used = [a for a in mesh_axes if a is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"Logical axes {logical_axes} map twice onto one mesh axis: {mesh_axes}.")
    return P(*mesh_axes)


def check_divisible(state: nnx.State, mesh: Mesh, rules=RULES) -> None:
    """Raises, before any compilation, if a sharded dimension does not divide its mesh axis."""
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            continue
        for dim, axis in zip(var.shape, spec(axes, rules)):
            if axis is not None and dim % mesh.shape[axis]:
                raise ValueError(f"Parameter {'.'.join(map(str, path))} has size {dim} along logical "
                                 f"axis mapped to '{axis}' ({mesh.shape[axis]} devices): it does not divide. "
                                 "Change the mesh or the rules.")


def state_shardings(state: nnx.State, mesh: Mesh, rules=RULES):
    """A NamedSharding per leaf of an nnx.State (replicated where no logical axes are given)."""
    def one(var):
        axes = var.get_metadata().get("logical_axes")
        return NamedSharding(mesh, spec(axes, rules) if axes is not None else P())
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over `data`, the rest replicated."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def like_params(tree, params, param_shardings):
    """Shardings for `tree` (e.g. an optimizer state): every subtree shaped like `params` (Adam's moments)
    takes `param_shardings`, every other leaf (step counters) is replicated."""
    treedef = jax.tree.structure(params)
    shardings = jax.tree.leaves(param_shardings)
    mesh = shardings[0].mesh

    def is_params(x):
        return jax.tree.structure(x) == treedef

    return jax.tree.map(lambda x: jax.tree.unflatten(treedef, shardings) if is_params(x)
                        else NamedSharding(mesh, P()), tree, is_leaf=is_params)
