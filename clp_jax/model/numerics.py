"""Numeric constants and small helpers shared by the model, the drafters, decoding and training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG_LOGIT = -1e30  # a finite "minus infinity": masked softmax rows and sampling stay NaN-free


def prefix_len(ok: jax.Array) -> jax.Array:
    """Length of the leading run of True along the last axis ([..., J] bool -> [...] int32)."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1)


def acceptance_ratio(accepted, offered) -> np.ndarray:
    """accepted / offered element-wise (host arrays), 0 where nothing was offered: per-head acceptance."""
    accepted, offered = np.asarray(accepted), np.asarray(offered)
    return np.where(offered > 0, accepted / np.maximum(offered, 1), 0.0)


def top_k_probs(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The `k` most likely tokens of softmax(logits) and their probabilities ([..., V] -> [..., k] each):
    the logits' top-k normalised by the log-partition (no [..., V] probability array is formed)."""
    logits = logits.astype(jnp.float32)
    top, ids = jax.lax.top_k(logits, k)
    return jnp.exp(top - jax.nn.logsumexp(logits, -1, keepdims=True)), ids.astype(jnp.int32)
