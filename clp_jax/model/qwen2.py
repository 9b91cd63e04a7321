"""The Qwen2 / Qwen2.5 decoder in Flax NNX.

The trunk (`Qwen2.__call__`) returns final-normed hidden states; the output projection
(`Qwen2.logits`) is separate so that MTP heads, the CLP and losses can reuse it. Layers are kept as
separate arrays (no stacking): on XLA:CPU a `lax.scan` over stacked layers decodes ~1.6x slower.

Every kernel is stored once as [out, in]; `use_cols` picks, per pass and at trace time, whether the
dots run as X @ W^T on activations [B, T, D] ("rows") or as W @ X on activations kept [D, B, T]
through the whole stack ("cols", the XLA:CPU default, where a 2-8 row pass then costs close to a
1-row pass). Module boundaries keep their [B, T, D] meaning either way.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from clp_jax.model.attention import Attention
from clp_jax.model.config import ModelConfig
from clp_jax.model.kv_cache import KVEntries, LayerCache, Tree
from clp_jax.model.layers import MLP, Proj, RMSNorm, logical

LAYOUT_ENV = "CLP_MATMUL_LAYOUT"
# Under the cols layout on XLA:CPU, dots over these many activation columns (B*T) cost about what one
# column costs; 5-7 columns cost more than 8, so a pass of 5-7 is padded up to 8 (`padded_width`).
CPU_CHEAP_COLUMNS = (1, 2, 3, 4, 8)
COLS_LOGITS_MAX = 64  # more rows than this (training, prefill): logits in the rows form, no [V, M] transpose
PAD_SENTINEL = 1 << 30  # position of padding slots: beyond any cache, so their KV writes are dropped


def resolve_layout(cfg: ModelConfig) -> str:
    """'rows' or 'cols' for this config and backend (see ModelConfig.matmul_layout)."""
    layout = cfg.matmul_layout
    if layout == "auto":
        layout = os.environ.get(LAYOUT_ENV, "auto") or "auto"
        if layout not in ("auto", "rows", "cols"):
            raise ValueError(f"{LAYOUT_ENV}={layout!r}: use rows, cols or auto.")
    if layout == "auto":
        layout = "cols" if jax.default_backend() == "cpu" else "rows"
    return layout


def use_cols(cfg: ModelConfig) -> bool:
    return resolve_layout(cfg) == "cols"


def padded_width(cfg: ModelConfig, batch: int, width: int) -> int:
    """The fed width a pass actually runs at: under cols on CPU, the smallest width >= `width` whose
    B*T is a cheap column count, when one exists below the next; else `width` itself."""
    if not use_cols(cfg) or jax.default_backend() != "cpu" or batch * width >= CPU_CHEAP_COLUMNS[-1]:
        return width
    for t in range(width, CPU_CHEAP_COLUMNS[-1] + 1):
        if batch * t in CPU_CHEAP_COLUMNS:
            return t
    return width


def unpadded_k(cfg: ModelConfig, batch: int, k: int) -> int:
    """The most heads, at most `k`, whose pass of k+1 slots runs at its own width (no padding up).

    On XLA:CPU under cols, k=4 feeds 5 slots that run at 8 (~1.15x a 4-slot pass) for a fourth draft
    accepted a few percent of the time, so k=3 decodes faster; elsewhere this is `k`.
    """
    while k > 1 and padded_width(cfg, batch, k + 1) != k + 1:
        k -= 1
    return k


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=cfg.jnp_param_dtype, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.hidden_size, **norm)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=cfg.jnp_dtype,
                       param_dtype=cfg.jnp_param_dtype, rngs=rngs)

    def __call__(self, x, positions, cache, kv_valid=None, cols: bool = False, tree: Tree | None = None,
                 write: bool = True):
        """x [B, T, D], or [D, B, T] with `cols`; returned in the same layout."""
        axis = 0 if cols else -1
        with jax.named_scope("attn"):
            h, cache = self.attn(self.attn_norm(x, axis), positions, cache, kv_valid, cols, tree, write)
        x = x + h
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.mlp_norm(x, axis), cols)
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
            self.lm_head = Proj((cfg.hidden_size,), (cfg.vocab_size,), use_bias=False,
                                in_axes=("embed",), out_axes=("vocab",), dtype=cfg.jnp_dtype,
                                param_dtype=cfg.jnp_param_dtype, rngs=rngs)  # [V, D]

    def __call__(self, tokens: jax.Array, positions: jax.Array,
                 cache: tuple[LayerCache, ...] | None = None,
                 kv_valid: jax.Array | None = None, tree: Tree | None = None, write: bool = True):
        """Runs the trunk.

        Args:
          tokens: [B, T] token ids.
          positions: [B, T] absolute positions (per row; also where the KV entries are written).
          cache: per-layer caches, or None for a cache-free causal pass.
          kv_valid: [B, T] padding mask for the cache-free pass (True = real token).
          tree: a draft tree's masks (kv_cache.Tree; with a cache): positions are then by depth.
          write: False (with a tree): the cache is only read; each layer's T new entries are returned.
        Returns:
          (hidden [B, T, D] after the final norm, updated cache, or per layer KVEntries [B, T, K, H] with
          `write=False`, or None without a cache).
        """
        if not write and (cache is None or tree is None):
            raise ValueError("write=False reads a cache as a tree pass does: give both a cache and a tree "
                             "(kv_cache.chain for a plain chunk).")
        B, T = tokens.shape
        cols = use_cols(self.cfg)
        width = padded_width(self.cfg, B, T)
        if width != T:  # padding slots: token 0 at a position past every cache (writes dropped)
            pad = ((0, 0), (0, width - T))
            tokens = jnp.pad(tokens, pad)
            positions = jnp.pad(positions, pad, constant_values=PAD_SENTINEL)
            if kv_valid is not None:
                kv_valid = jnp.pad(kv_valid, pad, constant_values=False)
            if tree is not None:  # padding slots see only themselves and write nothing
                eye = jnp.eye(width, dtype=bool)[None]
                tree = Tree(tree.base, jnp.pad(tree.ancestors, ((0, 0), (0, width - T), (0, width - T))) | eye,
                            jnp.pad(tree.cached, pad, constant_values=False))
        x = self.embed(tokens)  # [B, T, D]
        if cols:
            x = x.transpose(2, 0, 1)  # [D, B, T], kept so through every layer
        new_cache = []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, layer_cache = layer(x, positions, None if cache is None else cache[i], kv_valid, cols, tree,
                                       write)
            if not write:  # the real slots' entries
                layer_cache = KVEntries(layer_cache.k[:, :T], layer_cache.v[:, :T])
            new_cache.append(layer_cache)
        hidden = self.final_norm(x, 0 if cols else -1)
        if cols:
            hidden = hidden.transpose(1, 2, 0)  # [B, T, D]
        return hidden[:, :T], (None if cache is None else tuple(new_cache))

    def output_kernel(self, vocab: jax.Array | None = None) -> jax.Array:
        """The output projection [V, D] (the embedding table when tied); with `vocab` [U] its rows
        [U, D] (a gather: U*D values copied, so hoist it out of a decoding loop and pass it back
        to `logits` as `kernel`)."""
        kernel = (self.embed.embedding if self.cfg.tie_word_embeddings else self.lm_head.kernel)[...]
        return kernel if vocab is None else kernel[vocab]

    def logits(self, hidden: jax.Array, vocab: jax.Array | None = None, *,
               kernel: jax.Array | None = None) -> jax.Array:
        """Output projection [..., D] -> [..., V] in fp32; with `vocab` [U] only those rows [..., U];
        with `kernel` [U, D] (from `output_kernel(vocab)`) those precomputed rows instead.

        Under the cols layout (and at most COLS_LOGITS_MAX rows) the dot runs as W [V, D] @ hidden^T
        (rows padded to a cheap count on CPU) and the small [V, M] result is transposed back.
        """
        if kernel is None:
            kernel = self.output_kernel(vocab)  # [V or U, D]
        dtype = self.cfg.jnp_dtype
        kernel, h = kernel.astype(dtype), hidden.astype(dtype)
        lead = h.shape[:-1]
        M = math.prod(lead)
        if not use_cols(self.cfg) or M > COLS_LOGITS_MAX:
            return jnp.einsum("...D,VD->...V", h, kernel).astype(jnp.float32)
        h2 = h.reshape(M, h.shape[-1])  # [M, D]
        width = padded_width(self.cfg, 1, M)
        if width != M:
            h2 = jnp.pad(h2, ((0, width - M), (0, 0)))
        out = jax.lax.dot_general(kernel, h2, (((1,), (1,)), ((), ())))  # [V, M]
        # The barrier keeps XLA from folding the transpose below into the dot (which would turn it
        # back into the slow [M, D] @ [D, V] form on CPU).
        out = jax.lax.optimization_barrier(out)
        return out[:, :M].T.reshape(*lead, kernel.shape[0]).astype(jnp.float32)


def init_model(cfg: ModelConfig, seed: int = 0) -> Qwen2:
    """A randomly initialised model (tests and abstract shapes)."""
    return Qwen2(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> Qwen2:
    """The model with ShapeDtypeStruct leaves: no memory allocated."""
    return nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
