"""Room: token choice, pure functions of logits; greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from clp_jax.model.numerics import NEG_LOGIT


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probs(logits: jax.Array, sc: SamplingConfig) -> jax.Array:
    """The distribution tokens are drawn from: softmax(logits / T), filtered by top-k and top-p. [..., V]"""
    logits = logits.astype(jnp.float32) / max(sc.temperature, 1e-6)
    if sc.top_k:
        # the k-th largest as the min of the top k: slicing top_k's output makes XLA:CPU lower it to a full
        # sort of the vocabulary (112 ms against 1 ms at [4, 151936])
        kth = jax.lax.top_k(logits, sc.top_k)[0].min(-1, keepdims=True)
        logits = jnp.where(logits < kth, NEG_LOGIT, logits)
    p = jax.nn.softmax(logits, axis=-1)
    if sc.top_p < 1.0:
        p = jnp.where(p >= nucleus_cutoff(p, sc.top_p), p, 0.0)
        p = p / jnp.sum(p, axis=-1, keepdims=True)
    return p


NUCLEUS_CANDIDATES = 256  # the nucleus is looked for among the most likely tokens first


def _cutoff(desc: jax.Array, top_p: float) -> tuple[jax.Array, jax.Array]:
    """Over `desc` [..., n] (descending): which tokens the shortest prefix whose mass reaches top_p keeps (the
    first always stays) [..., n], and its smallest probability [..., 1] (a threshold: ties at the cut stay)."""
    keep = (jnp.cumsum(desc, axis=-1) - desc) < top_p
    return keep, jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)


def nucleus_cutoff(p: jax.Array, top_p: float) -> jax.Array:
    """The top-p threshold of p [..., V] -> [..., 1], as a full sort of the vocabulary gives it (XLA:CPU: ~20-40
    ms a row at V = 151,936, more than a pass of the 0.5B backbone). Read instead from the NUCLEUS_CANDIDATES + 1
    most likely tokens (a partial sort) when, in every row, the last of them is outside the nucleus by the same
    test (the usual case), or the row is uniform (rows nobody reads, such as zero logits: the cut is their value);
    exact where a prefix's cumulative sum is the prefix of the cumulative sum, as on XLA:CPU."""
    n = NUCLEUS_CANDIDATES + 1
    if p.shape[-1] <= n:
        return _cutoff(-jnp.sort(-p, axis=-1), top_p)[1]
    top = jax.lax.top_k(p, n)[0]  # [..., n], descending; not sliced (a slice turns it into a full sort)
    keep, cut = _cutoff(top, top_p)
    beyond = jnp.any(keep & (jnp.arange(n) == n - 1), axis=-1)  # the n-th most likely token is in the nucleus
    uniform = jnp.max(p, axis=-1) == jnp.min(p, axis=-1)
    return jax.lax.cond(jnp.all(~beyond | uniform), lambda: cut,
                        lambda: _cutoff(-jnp.sort(-p, axis=-1), top_p)[1])


def sample(key: jax.Array, p: jax.Array) -> jax.Array:
    """Draws one token per row of p [..., V]."""
    positive = p > 0
    # finite log-probabilities: no -inf and no denormal floor (XLA:CPU may flush it to zero)
    logits = jnp.where(positive, jnp.log(jnp.where(positive, p, 1.0)), NEG_LOGIT)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def choose(key: jax.Array, logits: jax.Array, sc: SamplingConfig) -> jax.Array:
    """Greedy argmax, or a sample from `probs`."""
    if sc.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample(key, probs(logits, sc))
