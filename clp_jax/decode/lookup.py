"""Room: drafts from the context (prompt lookup); reads a token buffer, writes nothing.

The tokens that followed the latest earlier occurrence of the text's last n tokens, in the prompt or the
committed output.

`propose` looks for the longest suffix (MAX_NGRAM down to MIN_NGRAM tokens) of each row's committed text
that occurred before, takes its latest occurrence, and proposes the k tokens that followed it (fewer when
the occurrence ends near the end of the text). One vectorised comparison per n-gram length over the whole
buffer [B, S]: negligible next to a backbone pass.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MAX_NGRAM = 4
MIN_NGRAM = 2


class Lookup(NamedTuple):
    tokens: jax.Array  # [B, k] proposed continuation (0 past `count`)
    count: jax.Array  # [B] tokens proposed (0: no match)
    ngram: jax.Array  # [B] length of the matched suffix (0: none)


def propose(buf: jax.Array, length: jax.Array, k: int) -> Lookup:
    """Continuations of each row's committed text buf[b, :length[b]] (buf [B, S], length [B])."""
    B, S = buf.shape
    rows = jnp.arange(B)
    p = jnp.arange(S)[None, :]  # [1, S] candidate end of an earlier occurrence
    ok = jnp.ones((B, S), bool)
    best_end = jnp.full((B,), -1, jnp.int32)
    ngram = jnp.zeros((B,), jnp.int32)
    for i in range(MAX_NGRAM):
        tail = buf[rows, jnp.maximum(length - 1 - i, 0)]  # [B] the suffix's i-th token from the end
        shifted = jnp.roll(buf, i, axis=1)  # shifted[:, p] = buf[:, p - i]
        ok = ok & (shifted == tail[:, None]) & (p >= i)
        n = i + 1
        if n >= MIN_NGRAM:
            hit = ok & (p <= length[:, None] - 2) & (length[:, None] > n)
            end = jnp.max(jnp.where(hit, p, -1), axis=1)  # the latest occurrence
            longer = end >= 0
            best_end = jnp.where(longer, end, best_end)
            ngram = jnp.where(longer, n, ngram)
    j = jnp.arange(k)[None, :]
    at = best_end[:, None] + 1 + j  # [B, k]
    count = jnp.where(best_end >= 0, jnp.minimum(k, length - 1 - best_end), 0)
    tokens = jnp.where(j < count[:, None], jnp.take_along_axis(buf, jnp.clip(at, 0, S - 1), axis=1), 0)
    return Lookup(tokens.astype(jnp.int32), count.astype(jnp.int32), ngram)
