"""Qwen2 building blocks with Hugging Face-faithful numerics: RMSNorm, rotary embeddings, SwiGLU.

Dimension letters used in shape comments across the package:
  B batch, T query positions, S key/cache positions, D model width, N query heads,
  K key/value heads, G query heads per KV head, H head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def logical(*axes: str | None) -> dict:
    """Parameter metadata naming each dimension by a logical axis (mapped to a mesh by sharding.py)."""
    return {"logical_axes": axes}


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32, cast back to the input dtype, then scaled (Hugging Face order)."""

    def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **logical("embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Sine and cosine of the rotary angles, in fp32.

    Args:
      positions: [B, T] integer positions.
    Returns:
      (sin, cos), each [B, T, H/2].
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates [B, T, heads, H] by the half-split convention of Hugging Face's `rotate_half`."""
    sin = sin[:, :, None, :].astype(x.dtype)  # [B, T, 1, H/2]
    cos = cos[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = nnx.Linear(dim, hidden, kernel_metadata=logical("embed", "mlp"), **kw)  # [D, F]
        self.up = nnx.Linear(dim, hidden, kernel_metadata=logical("embed", "mlp"), **kw)  # [D, F]
        self.down = nnx.Linear(hidden, dim, kernel_metadata=logical("mlp", "embed"), **kw)  # [F, D]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
