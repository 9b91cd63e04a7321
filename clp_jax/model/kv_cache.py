"""Static-shape key/value cache written by scatter at each row's own positions.

Each layer holds keys and values `[B, S, K, H]`. A forward pass writes its T new entries at
`positions [B, T]`; positions outside `[0, S)` are dropped (never clamped, unlike
`dynamic_update_slice`), so a chunk may run past the end of the cache without corrupting it.
Readers mask keys by position (`kv_pos <= q_pos`), so stale entries beyond a row's committed length
are never read and are simply overwritten by the next write at those positions.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from clp_jax.model.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    k: jax.Array  # [B, S, K, H]
    v: jax.Array  # [B, S, K, H]

    def write(self, positions: jax.Array, k_new: jax.Array, v_new: jax.Array) -> "LayerCache":
        """Scatters k_new, v_new [B, T, K, H] at positions [B, T]; out-of-range positions are dropped."""
        rows = jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)  # [B, T]
        k = self.k.at[rows, positions].set(k_new.astype(self.k.dtype), mode="drop")
        v = self.v.at[rows, positions].set(v_new.astype(self.v.dtype), mode="drop")
        return LayerCache(k, v)


class Tree(NamedTuple):
    """A draft tree fed in one pass (decode/verify.py): its slots sit at positions by depth, so siblings share
    a position. Each slot attends to the cache below `base` (the committed prefix) and to the fed slots
    `ancestors` marks (itself included); only the `cached` slots (one path, no two at a position) write their
    keys and values into the cache, the others' are dropped."""

    base: jax.Array  # [B] cache positions below this are committed
    ancestors: jax.Array  # [B, T, T] bool: slot t attends to slot u
    cached: jax.Array  # [B, T] bool: slot t's keys and values are written at its position


def init_cache(cfg: ModelConfig, batch: int, capacity: int) -> tuple[LayerCache, ...]:
    """An all-zero cache: one LayerCache per layer, each [B, capacity, K, H] in the compute dtype."""
    shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)
    return tuple(LayerCache(jnp.zeros(shape, cfg.jnp_dtype), jnp.zeros(shape, cfg.jnp_dtype))
                 for _ in range(cfg.num_layers))
