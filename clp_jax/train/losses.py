"""Training losses of the MTP heads, the CLP and the gate baseline.

Alignment (teacher forcing over a token sequence s with hidden states h of the frozen backbone):
at position t, h[t] has read s[..t]; the backbone's next token is s[t+1] (on the backbone's own greedy
text that is exactly argmax LM(h[t])). MTP head j (1-based, Backbone-as-Architect, offset 1) targets
s[t+1+j]; a gate head j (offset 0) targets s[t+j]. A target is valid only if it lies inside the
sequence and inside the loss mask (positions whose continuation is trusted, e.g. generated text).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from clp_jax.model.numerics import prefix_len


def shifted_targets(tokens: jax.Array, mask: jax.Array, k: int, offset: int) -> tuple[jax.Array, jax.Array]:
    """targets [B, T, k] with targets[b, t, j-1] = tokens[b, t+offset+j], and their validity [B, T, k].

    A target is valid where the source position t is in the mask and the target position is in the
    sequence and in the mask (so a head never learns across a padding or prompt boundary).
    """
    B, T = tokens.shape
    t = jnp.arange(T)[:, None] + offset + jnp.arange(1, k + 1)[None, :]  # [T, k]
    inside = t < T
    t = jnp.minimum(t, T - 1)
    targets = tokens[:, t]  # [B, T, k]
    valid = inside[None] & mask[:, :, None] & mask[:, t]
    return targets, valid


def head_weights(k: int, decay: float, warmup_steps: int, step: jax.Array) -> jax.Array:
    """Relative weight per head [k]: head j weighs decay**(j-1) relative to head 1, and heads 2..k ramp
    up linearly over `warmup_steps` (head 1 is never warmed up)."""
    w = decay ** jnp.arange(k, dtype=jnp.float32)
    ramp = jnp.clip(step.astype(jnp.float32) / max(warmup_steps, 1), 0.0, 1.0) if warmup_steps else 1.0
    return w * jnp.where(jnp.arange(k) == 0, 1.0, ramp)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-position CE of logits [..., C] against integer labels [...]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def clp_labels(correct: jax.Array, valid: jax.Array) -> jax.Array:
    """L* [B, T]: how many leading heads are right (correct, valid: [B, T, k])."""
    return prefix_len(correct & valid)
