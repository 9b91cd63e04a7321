"""Grouped-query self-attention with q/k/v biases (no output bias), rotary embeddings and a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clp_jax.model.config import ModelConfig
from clp_jax.model.kv_cache import KVEntries, LayerCache, Tree
from clp_jax.model.layers import Proj, apply_rope, rope_angles
from clp_jax.model.numerics import NEG_LOGIT as NEG_INF  # finite: fully masked rows stay NaN-free


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
        self.cfg = cfg
        self.q = Proj((D,), (N, H), use_bias=True, in_axes=("embed",),
                      out_axes=("q_heads", "head_dim"), **kw)  # [N, H, D]
        self.k = Proj((D,), (K, H), use_bias=True, in_axes=("embed",),
                      out_axes=("kv_heads", "head_dim"), **kw)  # [K, H, D]
        self.v = Proj((D,), (K, H), use_bias=True, in_axes=("embed",),
                      out_axes=("kv_heads", "head_dim"), **kw)  # [K, H, D]
        self.o = Proj((N, H), (D,), use_bias=False, in_axes=("q_heads", "head_dim"),
                      out_axes=("embed",), **kw)  # [D, N, H]

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None,
                 kv_valid: jax.Array | None = None, cols: bool = False, tree: Tree | None = None,
                 write: bool = True) -> tuple[jax.Array, LayerCache | KVEntries | None]:
        """Attends x [B, T, D] (or [D, B, T] with `cols`) at positions [B, T]; output in x's layout.

        With a cache, the new keys/values are scattered into it first and queries attend over the
        whole cache [B, S] masked by `kv_pos <= q_pos`. Without one, queries attend over the T new
        keys, causally by position, and additionally where `kv_valid [B, T]` (padding mask) is true.
        With a `tree` (and a cache), queries attend over the committed cache (below `tree.base`) and over
        the T new keys where `tree.ancestors` says, and only `tree.cached` slots are written; with
        `write=False` the cache is only read and the T new entries are returned (`KVEntries`) instead.
        """
        cfg = self.cfg
        B, T = positions.shape
        K, G, H = cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
        sin, cos = rope_angles(positions, H, cfg.rope_theta)  # [B, T, H/2]
        if cols:  # projections [heads, H, B, T]; only these small tensors change layout
            sin_c, cos_c = sin.transpose(2, 0, 1)[None], cos.transpose(2, 0, 1)[None]  # [1, H/2, B, T]
            q = _rope_cols(self.q.cols(x), sin_c, cos_c)  # [N, H, B, T]
            k = _rope_cols(self.k.cols(x), sin_c, cos_c).transpose(2, 3, 0, 1)  # [B, T, K, H]
            v = self.v.cols(x).transpose(2, 3, 0, 1)  # [B, T, K, H]
            q = q.reshape(K, G, H, B, T).transpose(3, 0, 1, 4, 2)  # [B, K, G, T, H]
        else:
            q = apply_rope(self.q.rows(x), sin, cos)  # [B, T, N, H]
            k = apply_rope(self.k.rows(x), sin, cos)  # [B, T, K, H]
            v = self.v.rows(x)  # [B, T, K, H]
            q = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
        if tree is not None:
            out = self._tree(q, k, v, cache, tree)
            if not write:
                cache = KVEntries(k, v)
            else:  # slots that write nothing go past the cache: dropped
                cache = cache.write(jnp.where(tree.cached, positions, cache.capacity), k, v)
        else:
            if cache is not None:
                cache = cache.write(positions, k, v)
                keys, values = cache.k, cache.v  # [B, K, H, S], [B, K, S, H]
                kv_pos = jnp.arange(cache.capacity)[None, :]  # [1, S]
            else:
                keys, values = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B, K, H, S=T], [B, K, S=T, H]
                kv_pos = positions  # [B, S=T]
            mask = kv_pos[:, None, :] <= positions[:, :, None]  # [B, T, S]
            if kv_valid is not None:
                mask &= kv_valid[:, None, :]
            # batch and KV head lead every operand, as the cache lies: XLA copies nothing before the dots
            scores = jnp.einsum("BKGTH,BKHS->BKGTS", q, keys.astype(q.dtype)).astype(jnp.float32)
            scores = jnp.where(mask[:, None, None], scores * (H ** -0.5), NEG_INF)
            probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [B, K, G, T, S]
            out = jnp.einsum("BKGTS,BKSH->BKGTH", probs, values.astype(q.dtype))  # [B, K, G, T, H]
        if cols:
            out = out.transpose(1, 2, 4, 0, 3).reshape(cfg.num_heads, H, B, T)
            return self.o.cols(out), cache  # [D, B, T]
        return self.o.rows(out.transpose(0, 3, 1, 2, 4).reshape(B, T, cfg.num_heads, H)), cache  # [B, T, D]

    def _tree(self, q, k, v, cache: LayerCache, tree: Tree) -> jax.Array:
        """The tree pass: softmax over [committed cache ; the fed slots' own keys], each masked apart; reads
        the cache below `tree.base` only. q [B, K, G, T, H], k and v [B, T, K, H] -> [B, K, G, T, H]."""
        H = self.cfg.head_dim
        committed = (jnp.arange(cache.capacity)[None, :] < tree.base[:, None])[:, None, :]  # [B, 1, S]
        dt = q.dtype
        s_cache = jnp.einsum("BKGTH,BKHS->BKGTS", q, cache.k.astype(dt)).astype(jnp.float32) * (H ** -0.5)
        s_tree = jnp.einsum("BKGTH,BUKH->BKGTU", q, k.astype(dt)).astype(jnp.float32) * (H ** -0.5)
        s_cache = jnp.where(committed[:, None, None], s_cache, NEG_INF)
        s_tree = jnp.where(tree.ancestors[:, None, None], s_tree, NEG_INF)
        S = s_cache.shape[-1]
        probs = jax.nn.softmax(jnp.concatenate([s_cache, s_tree], -1), axis=-1).astype(dt)  # [B, K, G, T, S+T]
        out = (jnp.einsum("BKGTS,BKSH->BKGTH", probs[..., :S], cache.v.astype(dt))
               + jnp.einsum("BKGTU,BUKH->BKGTH", probs[..., S:], v.astype(dt)))
        return out


def _rope_cols(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """`apply_rope` for [heads, H, B, T] with sin/cos [1, H/2, B, T]."""
    sin, cos = sin.astype(x.dtype), cos.astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=1)
