"""Qwen2 building blocks with Hugging Face-faithful numerics: RMSNorm, rotary embeddings, SwiGLU.

Dimension letters used in shape comments across the package:
  B batch, T query positions, S key/cache positions, D model width, N query heads,
  K key/value heads, G query heads per KV head, H head dim, F MLP width, V vocabulary.

Every linear map stores its kernel once, `[out..., in...]` (Hugging Face's order), and is applied in
one of two activation layouts (`Proj.rows` / `Proj.cols`, chosen per pass by `qwen2.use_cols`):
  rows: activations [B, T, D], the dot is X @ W^T (accelerators; large prefill chunks).
  cols: activations [D, B, T] kept transposed through the whole layer stack, the dot is W @ X.
On XLA:CPU a dot with 2-8 rows in the rows form goes to the general GEMM path and costs ~1.5x a
one-row (vector-matrix) dot although it reads the same weights; the cols form stays near the
one-row cost (DESIGN.md section 7).
"""

from __future__ import annotations

import math

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

    def __call__(self, x: jax.Array, axis: int = -1) -> jax.Array:
        """Normalizes along `axis` (-1 for rows [B, T, D], 0 for cols [D, B, T])."""
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=axis, keepdims=True) + self.eps)
        scale = self.scale[...].astype(x.dtype)
        if axis % x.ndim != x.ndim - 1:
            scale = scale.reshape(scale.shape + (1,) * (x.ndim - 1 - axis % x.ndim))
        return scale * x32.astype(x.dtype)


class Proj(nnx.Module):
    """A linear map with its kernel stored once as [*out, *in] (Hugging Face's [out, in] order).

    `rows(x)`: x [..., *in] -> [..., *out].  `cols(x)`: x [*in, ...] -> [*out, ...].
    Both read the same kernel; only the dot's operand order differs.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], *, use_bias: bool,
                 in_axes: tuple, out_axes: tuple, dtype, param_dtype, rngs: nnx.Rngs):
        fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
        w = nnx.initializers.lecun_normal(in_axis=-1, out_axis=-2)(rngs.params(), (fan_out, fan_in),
                                                                   param_dtype)
        self.kernel = nnx.Param(w.reshape(*out_shape, *in_shape), **logical(*out_axes, *in_axes))
        self.bias = (nnx.Param(jnp.zeros(out_shape, param_dtype), **logical(*out_axes))
                     if use_bias else None)
        self.n_in, self.n_out, self.dtype = len(in_shape), len(out_shape), dtype

    def _kernel_2d(self) -> jax.Array:
        """The kernel as [O, I] (a free reshape): one 2-D dot per call, so XLA:CPU never copies a
        multi-dimensional kernel into another layout before the dot."""
        w = self.kernel[...]
        return w.reshape(math.prod(w.shape[:self.n_out]), -1).astype(self.dtype)

    def rows(self, x: jax.Array) -> jax.Array:
        w = self._kernel_2d()  # [O, I]
        out_shape = self.kernel.shape[:self.n_out]
        lead = x.shape[:x.ndim - self.n_in]
        x2 = x.astype(self.dtype).reshape(math.prod(lead), w.shape[1])  # [M, I]
        y = jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ()))).reshape(*lead, *out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def cols(self, x: jax.Array) -> jax.Array:
        w = self._kernel_2d()  # [O, I]
        out_shape = self.kernel.shape[:self.n_out]
        trail = x.shape[self.n_in:]
        x2 = x.astype(self.dtype).reshape(w.shape[1], math.prod(trail))  # [I, M]
        y = jax.lax.dot_general(w, x2, (((1,), (0,)), ((), ()))).reshape(*out_shape, *trail)
        if self.bias is not None:
            b = self.bias[...].astype(self.dtype)
            y = y + b.reshape(b.shape + (1,) * len(trail))
        return y


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
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases; kernels [F, D], [F, D], [D, F]."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = Proj((dim,), (hidden,), in_axes=("embed",), out_axes=("mlp",), **kw)  # [F, D]
        self.up = Proj((dim,), (hidden,), in_axes=("embed",), out_axes=("mlp",), **kw)  # [F, D]
        self.down = Proj((hidden,), (dim,), in_axes=("mlp",), out_axes=("embed",), **kw)  # [D, F]

    def __call__(self, x: jax.Array, cols: bool = False) -> jax.Array:
        """x [B, T, D] (rows) or [D, B, T] (cols), returned in the same layout."""
        if cols:
            return self.down.cols(jax.nn.silu(self.gate.cols(x)) * self.up.cols(x))
        return self.down.rows(jax.nn.silu(self.gate.rows(x)) * self.up.rows(x))
