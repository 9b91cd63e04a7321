"""Room: the draft tree's shape (`verify` with DecodeConfig.tree); pure functions of the loop state, no writes.

A verify pass feeds each row's chunk: the committed tokens not cached yet (the last is the bonus token),
the chain of m drafts after it, then up to `tree` siblings: the drafter's runner-up at depths 1..n (n <= m),
each a leaf beside the chain draft of the same depth. A sibling sits at its depth's position, sees the
committed text, the chain up to its parent and itself, and writes nothing into the KV cache (its position
belongs to the chain draft); when it is accepted it is fed again at the head of the next chunk, which
caches it. The pass is one static shape: the ancestor mask and the positions are built per row from the
counts the loop state holds.

  slots:     [committed..., bonus | d1 d2 .. dm | s1 .. sn | padding]
  positions:  p0 ...        p     | p+1 .. p+m  | p+1 .. p+n
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clp_jax.model.kv_cache import Tree


def sibling_depth(last: jax.Array, n_draft: jax.Array, n_tree: jax.Array, width: int) -> jax.Array:
    """[B, W] the depth (1..n) of each slot that holds a sibling, 0 elsewhere. last [B]: the bonus's slot."""
    t = jnp.arange(width)[None, :]
    j = t - last[:, None] - n_draft[:, None]
    return jnp.where((j >= 1) & (j <= n_tree[:, None]), j, 0)


def tree_pass(fed: jax.Array, length: jax.Array, n_draft: jax.Array, n_tree: jax.Array, width: int
              ) -> tuple[jax.Array, Tree]:
    """The positions [B, W] (by depth) and the attention masks of a chunk of `width` slots starting at `fed`."""
    last = length - fed - 1
    depth = sibling_depth(last, n_draft, n_tree, width)  # [B, W]
    sib = depth > 0
    t = jnp.arange(width)
    positions = fed[:, None] + jnp.where(sib, last[:, None] + depth, t[None, :])
    u, q = t[None, None, :], t[None, :, None]  # key slot, query slot
    chain = (u <= q) & ~sib[:, None, :]  # a chain slot sees the chain before it, never a sibling
    parent = (last[:, None] + depth - 1)[:, :, None]  # a sibling's parent: the chain slot at depth - 1
    leaf = (u <= parent) | (u == q)
    ancestors = jnp.where(sib[:, :, None], leaf, chain)  # [B, W, W]
    return positions.astype(jnp.int32), Tree(fed, ancestors, ~sib)


def path_step(hidden, chunk, positions, last, n_acc, n_draft, sib_ok, pad_position: int):
    """The chunk seen along the accepted path: where a sibling was accepted at depth n_acc+1, its state and
    token move into the chain slot of that depth, and every slot past the path gets `pad_position` (so the
    drafter writes its cache for the committed path alone; siblings share positions with the chain)."""
    B, W = chunk.shape
    rows = jnp.arange(B)
    at = last + n_acc + 1  # [B] the path's slot of the accepted sibling
    src = jnp.clip(last + n_draft + n_acc + 1, 0, W - 1)
    dst = jnp.where(sib_ok, at, W)  # W: no move (dropped)
    hidden = hidden.at[rows, dst].set(hidden[rows, src], mode="drop")
    chunk = chunk.at[rows, dst].set(chunk[rows, src], mode="drop")
    end = last + n_acc + sib_ok.astype(last.dtype)  # the path's last slot
    positions = jnp.where(jnp.arange(W)[None, :] <= end[:, None], positions, pad_position)
    return hidden, chunk, positions
