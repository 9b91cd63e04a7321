"""Static-shape key/value cache written by scatter at each row's own positions.

Each layer holds keys `[B, K, H, S]` and values `[B, K, S, H]`: batch and KV head first, each in the layout
of its batched dot in attention (scores `[G*T, H] @ [H, S]`, outputs `probs [G*T, S] @ [S, H]` per row and KV
head), so a pass reads the cache as it lies. Both stored `[B, S, K, H]`, XLA:CPU copied every layer's cache
into that form before its dots (85 of 477 ms per step of batch-32 generation); keys `[B, K, S, H]` made the
score dot a transposed one, 2.6x slower. A forward pass writes its T new entries at `positions [B, T]`;
positions outside `[0, S)` are dropped (never clamped, unlike `dynamic_update_slice`), so a chunk may run
past the end of the cache without corrupting it.
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
    k: jax.Array  # [B, K, H, S]
    v: jax.Array  # [B, K, S, H]

    @property
    def capacity(self) -> int:
        return self.v.shape[2]

    def write(self, positions: jax.Array, k_new: jax.Array, v_new: jax.Array) -> "LayerCache":
        """Scatters k_new, v_new [B, T, K, H] at positions [B, T]; out-of-range positions are dropped."""
        if positions.size == 1:
            # XLA turns a one-entry scatter into a dynamic-update-slice, which its fusion then duplicated for the
            # attention dots' size-1-batch view: inside the decoding loop every layer's cache was copied every
            # pass (7 of 75 ms of an `ar` pass at batch 1). A second entry, past the cache, keeps it a scatter.
            positions = jnp.concatenate([positions, jnp.full_like(positions, self.capacity)], axis=1)  # [1, 2]
            k_new, v_new = (jnp.concatenate([x, x], axis=1) for x in (k_new, v_new))
        rows = jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)  # [B, T]
        # advanced indices apart from the sliced axes: the indexed views are [B, T, K, H], as the new entries
        k = self.k.at[rows, :, :, positions].set(k_new.astype(self.k.dtype), mode="drop")
        v = self.v.at[rows, :, positions].set(v_new.astype(self.v.dtype), mode="drop")
        return LayerCache(k, v)

    def put_rows(self, rows: jax.Array, other: "LayerCache") -> "LayerCache":
        """This cache with rows `rows` [R] replaced by `other`'s (R rows of capacity P) in their first P
        positions (later positions keep their old entries, masked by position until overwritten); index B:
        dropped."""
        P = other.capacity
        k = self.k.at[rows, :, :, :P].set(other.k.astype(self.k.dtype), mode="drop")
        v = self.v.at[rows, :, :P].set(other.v.astype(self.v.dtype), mode="drop")
        return LayerCache(k, v)


def empty_layer_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=None) -> LayerCache:
    """One layer's all-zero cache: keys [B, K, H, capacity], values [B, K, capacity, H] (dtype: the config's
    compute dtype by default)."""
    B, K, H = batch, cfg.num_kv_heads, cfg.head_dim
    dtype = cfg.jnp_dtype if dtype is None else dtype
    return LayerCache(jnp.zeros((B, K, H, capacity), dtype), jnp.zeros((B, K, capacity, H), dtype))


def init_cache(cfg: ModelConfig, batch: int, capacity: int) -> tuple[LayerCache, ...]:
    """An all-zero cache: one LayerCache per layer (`empty_layer_cache`) in the compute dtype."""
    return tuple(empty_layer_cache(cfg, batch, capacity) for _ in range(cfg.num_layers))


class KVEntries(NamedTuple):
    """One layer's new keys and values [B, T, K, H] from a pass that only read the cache (attention with
    `write=False`); `LayerCache.write` puts them in place afterwards. The decoding loop runs its width
    `lax.switch` this way: a branch that wrote the cache would make XLA copy the cache in and out of it."""

    k: jax.Array
    v: jax.Array


class Tree(NamedTuple):
    """A draft tree fed in one pass (decode/verify.py): its slots sit at positions by depth, so siblings share
    a position. Each slot attends to the cache below `base` (the committed prefix) and to the fed slots
    `ancestors` marks (itself included); only the `cached` slots (one path, no two at a position) write their
    keys and values into the cache, the others' are dropped."""

    base: jax.Array  # [B] cache positions below this are committed
    ancestors: jax.Array  # [B, T, T] bool: slot t attends to slot u
    cached: jax.Array  # [B, T] bool: slot t's keys and values are written at its position


def chain(base: jax.Array, width: int) -> Tree:
    """A chunk of `width` slots fed at positions base.. as a Tree: slot t sees the committed cache below `base`
    [B] and the slots up to itself (a causal pass over the chunk), and every slot writes its entries."""
    B = base.shape[0]
    causal = jnp.tril(jnp.ones((width, width), bool))
    return Tree(base, jnp.broadcast_to(causal, (B, width, width)), jnp.ones((B, width), bool))
