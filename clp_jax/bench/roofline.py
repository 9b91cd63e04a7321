"""The memory-bandwidth roofline of one decoding pass.

A batch-1 decoding pass reads every weight once, so it cannot run faster than
weight bytes / memory bandwidth. The bandwidth is measured here, as the best of a numpy copy and a
compiled XLA copy of a buffer much larger than the caches (bytes read + bytes written per second).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from clp_jax.weights.convert import flat_params
from clp_jax.model.qwen2 import Qwen2


def weight_bytes_per_pass(model: Qwen2) -> int:
    """Bytes of weights one pass reads: all parameters, except that the embedding table is only
    gathered (a few rows) unless it doubles as the output projection (tied)."""
    total = 0
    for name, value in flat_params(model).items():
        if name == "embed.embedding" and not model.cfg.tie_word_embeddings:
            continue
        total += value.size * value.dtype.itemsize
    return total


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s (read + write), best of numpy and XLA copies."""
    n = nbytes // 4
    src = np.random.default_rng(0).random(n, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    x = jnp.asarray(src)
    copy = jax.jit(lambda a: a + 1.0)  # read once, write once; cannot be elided
    copy(x).block_until_ready()
    for _ in range(repeats):
        t0 = time.perf_counter()
        copy(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def roofline(model: Qwen2, seconds_per_pass: float, bandwidth: float | None = None) -> dict:
    """How close a measured pass time comes to weight bytes / bandwidth."""
    bandwidth = bandwidth or copy_bandwidth()
    nbytes = weight_bytes_per_pass(model)
    bound = nbytes / bandwidth
    return {"weight_bytes_per_pass": nbytes, "copy_bandwidth_gb_s": bandwidth / 1e9,
            "roofline_ms_per_pass": 1e3 * bound, "measured_ms_per_pass": 1e3 * seconds_per_pass,
            "fraction_of_roofline": bound / seconds_per_pass}
