"""The memory-bandwidth roofline of one decoding pass.

A batch-1 decoding pass reads every weight once, so it cannot run faster than
weight bytes / memory bandwidth. The bandwidth is measured here as a streaming read (the kind of
access a pass makes) of a buffer far beyond the caches, repeated, reported as a median with its spread
(`read_bandwidth`); the old best-of-5 copy figure swung 27-38 GB/s between runs.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

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


def _read_kernels(buf: np.ndarray, x: jax.Array) -> dict:
    """Streaming reads of the whole buffer, each returning a tiny result (so nothing big is written)."""
    cols = 4096
    row_sum = jax.jit(lambda a: jnp.sum(a.reshape(-1, cols), axis=1))
    gemv = jax.jit(lambda a, v: a.reshape(-1, cols) @ v)  # the access pattern of a one-row pass
    ones = jnp.ones((cols,), x.dtype)
    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    chunks = np.array_split(buf, 4 * (os.cpu_count() or 1))
    return {
        "xla_row_sum": lambda: row_sum(x).block_until_ready(),
        "xla_gemv": lambda: gemv(x, ones).block_until_ready(),
        "numpy_threads_sum": lambda: sum(pool.map(lambda c: float(np.add.reduce(c)), chunks)),
    }


def read_bandwidth(nbytes: int = 3 << 29, repeats: int = 15) -> dict:
    """Streaming-read memory bandwidth (bytes/s) over an fp32 buffer far beyond the caches (1.5 GiB by
    default, about a pass's weights): several read-reduce kernels (XLA row sums, an XLA matrix-vector
    product, threaded numpy sums), run interleaved `repeats` times each; the kernel with the best median
    is the yardstick. Returns {'bandwidth': median B/s, 'p10', 'p90', 'min', 'max', 'kernel', 'repeats',
    'medians' per kernel}."""
    n = nbytes // 4 // 4096 * 4096
    buf = np.random.default_rng(0).random(n, dtype=np.float32)
    x = jnp.asarray(buf)
    kernels = _read_kernels(buf, x)
    for f in kernels.values():
        f()  # compile, fault pages in
    rates = {name: [] for name in kernels}
    for _ in range(repeats):
        for name, f in kernels.items():
            t0 = time.perf_counter()
            f()
            rates[name].append(n * 4 / (time.perf_counter() - t0))
    medians = {name: float(np.median(r)) for name, r in rates.items()}
    best = max(medians, key=medians.get)
    r = np.asarray(rates[best])
    del x, buf
    return {"bandwidth": medians[best], "p10": float(np.percentile(r, 10)),
            "p90": float(np.percentile(r, 90)), "min": float(r.min()), "max": float(r.max()),
            "kernel": best, "repeats": repeats, "medians": medians}


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s (read + write), best of numpy and XLA copies.

    Unstable from run to run (37.8 vs 27.0 GB/s on one machine class); the roofline now uses
    `read_bandwidth`. Kept for comparison."""
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


def roofline(model: Qwen2, seconds_per_pass: float, bandwidth: dict | float | None = None) -> dict:
    """How close a measured pass time comes to weight bytes / bandwidth.

    `bandwidth`: a `read_bandwidth()` result (measured here if None) or a plain figure in B/s.
    The fraction comes with the bandwidth's spread (p10..p90 of its repeats) turned into a fraction range.
    """
    bw = read_bandwidth() if bandwidth is None else bandwidth
    if not isinstance(bw, dict):
        bw = {"bandwidth": float(bw), "p10": float(bw), "p90": float(bw), "kernel": "given"}
    nbytes = weight_bytes_per_pass(model)
    bound = nbytes / bw["bandwidth"]
    return {"weight_bytes_per_pass": nbytes,
            "bandwidth_gb_s": bw["bandwidth"] / 1e9,
            "bandwidth_p10_p90_gb_s": (bw["p10"] / 1e9, bw["p90"] / 1e9),
            "bandwidth_kernel": bw["kernel"],
            "roofline_ms_per_pass": 1e3 * bound, "measured_ms_per_pass": 1e3 * seconds_per_pass,
            "fraction_of_roofline": bound / seconds_per_pass,
            # the fraction at the bandwidth's p90 and p10 (a higher bandwidth gives a lower fraction)
            "fraction_p10_p90": (nbytes / bw["p90"] / seconds_per_pass, nbytes / bw["p10"] / seconds_per_pass)}
