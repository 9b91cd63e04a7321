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
