"""Training objectives on windows of the feature store: one per phase, one drafter interface for both kinds.

A batch is a window of cached records: hidden [B, T, D] (the trunk's h_p), tokens [B, T] (x_p),
labels [B, T] (y_p = the backbone's greedy choice of the token at p+1; -1 where p is not an anchor that
decoding would draft from, e.g. inside a prompt), lengths [B], and optionally soft_ids / soft_probs
[B, T, K] (the top-K of the backbone's distribution at p).

Alignment. Both drafters return `unrolled(...)` states [k, B, T, D] where entry [j, :, p] (j 0-based)
scores the token at p+2 for the chain anchored at n = p-j: its target is y_{p+1}. The draft layer runs
its training-time test (step j reads its own earlier outputs), the Medusa heads move head j's state at
n to p. A target is valid when the anchor is an anchor (y_n >= 0) and the target exists (y_{p+1} >= 0).

* `drafter_loss`: cross-entropy over the drafters' vocabulary U (hard labels y, optionally mixed with
  the backbone's top-K distribution: `soft_weight`), draft j weighted `head_decay**j`; plus, with the
  gate baseline, its heads (offset 0: head j at n targets y_{n+j}) and its MLP (a sigmoid per head on
  whether the head is right).
* `clp_loss`: the CLP on L* = how many leading drafts of the drafter's own chain (frozen) equal y.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from clp_jax.drafting.heads import Heads, clp_length
from clp_jax.model.numerics import prefix_len

CLP_MARGINS = (None, 0.5, 0.7, 0.9, 0.95)  # evaluated margins of `clp`; None: the argmax (decode.py's default)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """[train]: optimisation of the drafter phase and the CLP phase."""

    learning_rate: float = 3e-4
    warmup_steps: int = 50
    min_learning_rate_ratio: float = 0.05  # cosine decay to this fraction of learning_rate
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    head_decay: float = 0.8  # draft j (1-based) weighs decay**(j-1)
    soft_weight: float = 0.0  # 0: hard labels; w: (1-w) * CE(y) + w * CE(backbone's top-K distribution)
    gate_weight: float = 1.0  # the gate baseline's terms (only when heads.gate = true)
    clp_learning_rate: float = 3e-3

    def __post_init__(self):
        for name in ("learning_rate", "grad_clip", "clp_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)}.")
        if not 0 < self.head_decay <= 1:
            raise ValueError(f"train.head_decay must be in (0, 1], got {self.head_decay}.")
        for name in ("soft_weight", "min_learning_rate_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"train.{name} must be in [0, 1], got {getattr(self, name)}.")
        for name in ("warmup_steps", "weight_decay", "gate_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}.")


def _later(x: jax.Array, n: int, fill) -> jax.Array:
    """x [B, T, ...] read n positions later: out[:, p] = x[:, p+n] (fill past the end)."""
    if n == 0:
        return x
    pad = jnp.full((x.shape[0], n) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, n:], pad], axis=1)


def _earlier(x: jax.Array, n: int, fill) -> jax.Array:
    """x [B, T, ...] read n positions earlier: out[:, p] = x[:, p-n] (fill before the start)."""
    if n == 0:
        return x
    pad = jnp.full((x.shape[0], n) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([pad, x[:, :-n]], axis=1)


def draft_targets(labels: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Targets y_{p+1} [B, T] and validity [k, B, T] of entry [j, :, p] (anchor n = p-j has y_n >= 0)."""
    target = _later(labels, 1, -1)
    valid = jnp.stack([(target >= 0) & (_earlier(labels, j, -1) >= 0) for j in range(k)])
    return target, valid


def draft_logits(backbone, states: jax.Array, vocab: jax.Array) -> jax.Array:
    """states [..., D] -> fp32 logits [..., U] over the drafters' vocabulary through the frozen LM head."""
    kernel = backbone.output_kernel(vocab)  # [U, D]
    return jnp.einsum("...D,UD->...U", states.astype(kernel.dtype), kernel).astype(jnp.float32)


def vocab_index(vocab: jax.Array, vocab_size: int) -> jax.Array:
    """[V] column of each token id in `vocab` (-1 where absent)."""
    return jnp.full((vocab_size,), -1, jnp.int32).at[vocab].set(jnp.arange(vocab.shape[0], dtype=jnp.int32))


def _soft_ce(logp: jax.Array, ids: jax.Array, probs: jax.Array, index: jax.Array) -> jax.Array:
    """CE of logp [..., U] against the backbone's top-K (ids, probs [..., K]) renormalised over U."""
    col = index[ids]  # [..., K]
    p = jnp.where(col >= 0, probs, 0.0)
    p = p / jnp.maximum(jnp.sum(p, -1, keepdims=True), 1e-9)
    return -jnp.sum(p * jnp.take_along_axis(logp, jnp.maximum(col, 0), -1), -1)


def drafter_loss(heads: Heads, backbone, batch: dict, tc: TrainConfig, vocab: jax.Array):
    """Loss and metrics of the drafter (and the gate baseline) on one window batch."""
    k = heads.cfg.k
    index = vocab_index(vocab, backbone.cfg.vocab_size)
    states = heads.drafter.unrolled(backbone, batch["hidden"], batch["tokens"], k)  # [k, B, T, D]
    logp = jax.nn.log_softmax(draft_logits(backbone, states, vocab), -1)  # [k, B, T, U]
    target, valid = draft_targets(batch["labels"], k)  # [B, T], [k, B, T]
    col = index[jnp.maximum(target, 0)]  # [B, T]
    scored = valid & (col >= 0)[None]  # targets outside U cannot be scored (they count as misses)
    ce = -jnp.take_along_axis(logp, jnp.broadcast_to(jnp.maximum(col, 0)[None, ..., None], (k,) + col.shape + (1,)),
                              -1)[..., 0]  # [k, B, T]
    if tc.soft_weight:
        soft = _soft_ce(logp, _later(batch["soft_ids"], 1, 0)[None], _later(batch["soft_probs"], 1, 0.0)[None], index)
        ce = (1 - tc.soft_weight) * ce + tc.soft_weight * soft
    per_draft = jnp.sum(ce * scored, (1, 2)) / jnp.maximum(jnp.sum(scored, (1, 2)), 1)  # [k]
    w = tc.head_decay ** jnp.arange(k, dtype=jnp.float32)
    loss = jnp.sum(w * per_draft) / jnp.sum(w)
    hits = jnp.sum((vocab[jnp.argmax(logp, -1)] == target[None]) & valid, (1, 2))
    metrics = {"ce": per_draft, "hits": hits, "count": jnp.sum(valid, (1, 2))}
    if heads.gate is not None and tc.gate_weight:
        g_loss, g_metrics = _gate_loss(heads, backbone, batch, vocab, index)
        loss = loss + tc.gate_weight * g_loss
        metrics.update(g_metrics)
    metrics["loss"] = loss
    return loss, metrics


def _gate_loss(heads: Heads, backbone, batch: dict, vocab, index):
    """The gate baseline: heads j=0..k-1 at n target y_{n+j} (head 0 competes with the LM head); the MLP
    learns, per head, whether the head is right."""
    k = heads.cfg.k
    labels, h = batch["labels"], batch["hidden"]
    logp = jax.nn.log_softmax(draft_logits(backbone, heads.gate_heads(h), vocab), -1)  # [B, T, k, U]
    gate_logits = heads.gate(h)  # [B, T, k]
    total, hit_rate = 0.0, []
    anchor_ok = labels >= 0
    for j in range(k):
        target = _later(labels, j, -1)
        valid = anchor_ok & (target >= 0)
        col = index[jnp.maximum(target, 0)]
        scored = valid & (col >= 0)
        ce = -jnp.take_along_axis(logp[:, :, j], jnp.maximum(col, 0)[..., None], -1)[..., 0]
        hit = jax.lax.stop_gradient((vocab[jnp.argmax(logp[:, :, j], -1)] == target).astype(jnp.float32))
        bce = optax.sigmoid_binary_cross_entropy(gate_logits[..., j], hit)
        n = jnp.maximum(jnp.sum(valid), 1)
        total = total + jnp.sum(ce * scored) / jnp.maximum(jnp.sum(scored), 1) + jnp.sum(bce * valid) / n
        hit_rate.append(jnp.sum(hit * valid) / n)
    return total, {"gate_head_acc": jnp.stack(hit_rate)}


def chain_correct(heads: Heads, backbone, batch: dict, vocab: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Whether each draft of the (frozen) chain anchored at n equals y: [B, T, k], and the anchors [B, T]
    (y_n >= 0). Draft j's entry at p = n+j is realigned to its anchor n."""
    k = heads.cfg.k
    states = jax.lax.stop_gradient(heads.drafter.unrolled(backbone, batch["hidden"], batch["tokens"], k))
    pred = vocab[jnp.argmax(draft_logits(backbone, states, vocab), -1)]  # [k, B, T]
    labels = batch["labels"]
    ok = jnp.stack([_later(pred[j], j, -2) == _later(labels, j + 1, -3) for j in range(k)], -1)
    return ok, labels >= 0


def clp_loss(heads: Heads, backbone, batch: dict, tc: TrainConfig, vocab: jax.Array):
    """The CLP's k+1-way cross-entropy on L* of the frozen drafter's chain, at every anchor."""
    k = heads.cfg.k
    ok, anchors = chain_correct(heads, backbone, batch, vocab)
    target = prefix_len(ok)  # [B, T] L*
    logits = heads.clp(batch["hidden"])  # [B, T, k+1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
    n = jnp.maximum(jnp.sum(anchors), 1)
    loss = jnp.sum(ce * anchors) / n
    pred = jnp.argmax(logits, -1)
    pair = jnp.where(anchors, target * (k + 1) + pred, (k + 1) ** 2)
    confusion = jnp.bincount(pair.reshape(-1), length=(k + 1) ** 2 + 1)[:-1].reshape(k + 1, k + 1)
    # what `clp` would commit at each margin (CLP_MARGINS; the argmax first), and how many of those heads are wrong
    # (every head past the chain's first miss: the text has left the backbone's)
    committed = jnp.stack([clp_length(logits, k, m) for m in CLP_MARGINS])  # [M, B, T]
    wrong = jnp.maximum(committed - target[None], 0)
    margins = {"margin_heads": jnp.sum(committed * anchors, (1, 2)), "margin_wrong": jnp.sum(wrong * anchors, (1, 2))}
    return loss, {"loss": loss, "accuracy": jnp.sum((pred == target) * anchors) / n, "confusion": confusion, **margins,
                  "hits": jnp.sum(ok & anchors[..., None], (0, 1)), "count": jnp.sum(anchors) + jnp.zeros((k,), jnp.int32)}


OBJECTIVES = {"drafter": drafter_loss, "clp": clp_loss}
