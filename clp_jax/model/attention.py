"""Grouped-query self-attention with q/k/v biases (no output bias), rotary embeddings and a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clp_jax.model.config import ModelConfig
from clp_jax.model.kv_cache import LayerCache
from clp_jax.model.numerics import NEG_LOGIT as NEG_INF  # finite: fully masked rows stay NaN-free
from clp_jax.model.layers import apply_rope, logical, rope_angles



class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
        self.cfg = cfg
        self.q = nnx.Einsum("BTD,DNH->BTNH", (D, N, H), (N, H),
                            kernel_metadata=logical("embed", "q_heads", "head_dim"),
                            bias_metadata=logical("q_heads", "head_dim"), **kw)
        self.k = nnx.Einsum("BTD,DKH->BTKH", (D, K, H), (K, H),
                            kernel_metadata=logical("embed", "kv_heads", "head_dim"),
                            bias_metadata=logical("kv_heads", "head_dim"), **kw)
        self.v = nnx.Einsum("BTD,DKH->BTKH", (D, K, H), (K, H),
                            kernel_metadata=logical("embed", "kv_heads", "head_dim"),
                            bias_metadata=logical("kv_heads", "head_dim"), **kw)
        self.o = nnx.Einsum("BTNH,NHD->BTD", (N, H, D), None,
                            kernel_metadata=logical("q_heads", "head_dim", "embed"), **kw)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LayerCache | None,
                 kv_valid: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
        """Attends x [B, T, D] at positions [B, T].

        With a cache, the new keys/values are scattered into it first and queries attend over the
        whole cache [B, S] masked by `kv_pos <= q_pos`. Without one, queries attend over the T new
        keys, causally by position, and additionally where `kv_valid [B, T]` (padding mask) is true.
        """
        cfg = self.cfg
        sin, cos = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        q = apply_rope(self.q(x), sin, cos)  # [B, T, N, H]
        k = apply_rope(self.k(x), sin, cos)  # [B, T, K, H]
        v = self.v(x)  # [B, T, K, H]
        if cache is not None:
            cache = cache.write(positions, k, v)
            k, v = cache.k, cache.v  # [B, S, K, H]
            kv_pos = jnp.arange(k.shape[1])[None, :]  # [1, S]
        else:
            kv_pos = positions  # [B, S=T]
        mask = kv_pos[:, None, :] <= positions[:, :, None]  # [B, T, S]
        if kv_valid is not None:
            mask &= kv_valid[:, None, :]

        B, T = x.shape[:2]
        q = q.reshape(B, T, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim)  # [B, T, K, G, H]
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k.astype(q.dtype)).astype(jnp.float32)
        scores = scores * (cfg.head_dim ** -0.5)
        scores = jnp.where(mask[:, None, None], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [B, K, G, T, S]
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(q.dtype))
        out = out.reshape(B, T, cfg.num_heads, cfg.head_dim)  # [B, T, N, H]
        return self.o(out), cache
