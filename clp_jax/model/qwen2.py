"""The Qwen2 / Qwen2.5 decoder in Flax NNX.

The trunk (`Qwen2.__call__`) returns final-normed hidden states; the output projection
(`Qwen2.logits`) is separate so that MTP heads, the CLP and losses can reuse it. Layers are kept as
separate arrays (no stacking): on XLA:CPU a `lax.scan` over stacked layers decodes ~1.6x slower.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clp_jax.model.attention import Attention
from clp_jax.model.config import ModelConfig
from clp_jax.model.kv_cache import LayerCache
from clp_jax.model.layers import MLP, RMSNorm, logical


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.hidden_size, **norm)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=cfg.jnp_dtype,
                       param_dtype=cfg.jnp_param_dtype, rngs=rngs)

    def __call__(self, x, positions, cache, kv_valid=None):
        with jax.named_scope("attn"):
            h, cache = self.attn(self.attn_norm(x), positions, cache, kv_valid)
        x = x + h
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.mlp_norm(x))
        return x, cache


class Qwen2(nnx.Module):
    """Qwen2 trunk plus a tied or untied output projection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.jnp_dtype,
                               param_dtype=cfg.jnp_param_dtype,
                               embedding_metadata=logical("vocab", "embed"), rngs=rngs)  # [V, D]
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                  param_dtype=cfg.jnp_param_dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False,
                                      dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                                      kernel_metadata=logical("embed", "vocab"), rngs=rngs)  # [D, V]

    def __call__(self, tokens: jax.Array, positions: jax.Array,
                 cache: tuple[LayerCache, ...] | None = None,
                 kv_valid: jax.Array | None = None):
        """Runs the trunk.

        Args:
          tokens: [B, T] token ids.
          positions: [B, T] absolute positions (per row; also where the KV entries are written).
          cache: per-layer caches, or None for a cache-free causal pass.
          kv_valid: [B, T] padding mask for the cache-free pass (True = real token).
        Returns:
          (hidden [B, T, D] after the final norm, updated cache or None).
        """
        x = self.embed(tokens)  # [B, T, D]
        new_cache = []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, layer_cache = layer(x, positions, None if cache is None else cache[i], kv_valid)
            new_cache.append(layer_cache)
        hidden = self.final_norm(x)
        return hidden, (None if cache is None else tuple(new_cache))

    def logits(self, hidden: jax.Array, vocab: jax.Array | None = None) -> jax.Array:
        """Output projection [..., D] -> [..., V] in fp32; with `vocab` [U] only those columns [..., U]."""
        if vocab is None:
            out = self.embed.attend(hidden) if self.cfg.tie_word_embeddings else self.lm_head(hidden)
        else:
            kernel = (self.embed.embedding[...][vocab].T if self.cfg.tie_word_embeddings
                      else self.lm_head.kernel[...][:, vocab])  # [D, U]
            out = jnp.einsum("...D,DU->...U", hidden.astype(kernel.dtype), kernel)
        return out.astype(jnp.float32)


def init_model(cfg: ModelConfig, seed: int = 0) -> Qwen2:
    """A randomly initialised model (tests and abstract shapes)."""
    return Qwen2(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> Qwen2:
    """The model with ShapeDtypeStruct leaves: no memory allocated."""
    return nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
