"""Calibrating the drafts' confidences: one temperature per draft position, fitted on held-out records.

Draft j's confidence is its top-1 probability softmax(logits_j / T_j). The training-time test feeds the
true tokens into the chain, so draft j's figures are conditional on drafts 1..j-1 being right: exactly
what the draft budget of `verify` needs (the chance that one more draft is accepted, given the earlier
ones were). T_j is chosen on a grid (1.0 included) by the held-out log-loss of that event: the top-1
confidence read as the probability that the draft is the backbone's choice y (a proper score for the one
number the budget reads; the full-distribution NLL of temperature scaling, Guo et al. 2017, also moves the
probabilities the budget never uses, and fitted on it the top-1 confidence came out less calibrated than
at T = 1). The report gives both losses, the reliability table (confidence bin -> accuracy) and the
expected calibration error at T = 1 and at T_j.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clp_jax.drafting.heads import Heads
from clp_jax.train.feature_store import FeatureStore
from clp_jax.train.objectives import draft_logits, draft_targets, vocab_index

GRID = np.unique(np.append(np.exp(np.linspace(np.log(0.5), np.log(6.0), 40)), 1.0)).astype(np.float32)  # candidates
BINS = np.linspace(0.0, 1.0, 11)


def reliability(conf: np.ndarray, correct: np.ndarray) -> tuple[list[dict], float]:
    """Per confidence bin: count, mean confidence, accuracy; and the expected calibration error."""
    rows, ece, n = [], 0.0, max(len(conf), 1)
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        m = (conf >= lo) & ((conf < hi) if hi < 1 else (conf <= hi))
        if m.any():
            rows.append({"bin": [round(float(lo), 1), round(float(hi), 1)], "count": int(m.sum()),
                         "confidence": round(float(conf[m].mean()), 4), "accuracy": round(float(correct[m].mean()), 4)})
            ece += m.sum() / n * abs(conf[m].mean() - correct[m].mean())
    return rows, round(float(ece), 4)


def top1_log_loss(conf: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """[G] mean log-loss of `conf` [N, G] (top-1 confidence at each temperature) as the probability of
    `correct` [N] (whether the top-1 draft was right)."""
    p = np.clip(conf.astype(np.float64), 1e-7, 1 - 1e-7)
    c = correct.astype(np.float64)[:, None]
    return -np.mean(c * np.log(p) + (1 - c) * np.log1p(-p), axis=0)


def fit(heads: Heads, backbone, store: FeatureStore, records: np.ndarray, batch_size: int = 2,
        max_records: int = 256) -> dict:
    """Temperatures [k] and the reliability report, from the drafts at every held-out anchor."""
    k = heads.cfg.k
    vocab = (jnp.asarray(heads.draft_vocab[...]) if heads.draft_vocab is not None
             else jnp.arange(backbone.cfg.vocab_size, dtype=jnp.int32))
    index = vocab_index(vocab, backbone.cfg.vocab_size)
    grid = jnp.asarray(GRID)
    hg, hs = nnx.split(heads)
    bg, bs = nnx.split(backbone)

    @jax.jit
    def batch_stats(hs, bs, hidden, tokens, labels):
        h, b = nnx.merge(hg, hs), nnx.merge(bg, bs)
        logits = draft_logits(b, h.drafter.unrolled(b, hidden, tokens, k), vocab)  # [k, B, T, U]
        target, valid = draft_targets(labels, k)
        col = index[jnp.maximum(target, 0)]  # [B, T]
        correct = (jnp.argmax(logits, -1) == col[None]) & (col >= 0)[None]  # [k, B, T]
        in_u = valid & (col >= 0)[None]

        def at(t):  # one temperature at a time: [k, B, T, U] live, not [k, B, T, G, U]
            logp = jax.nn.log_softmax(logits / t, -1)
            nll = -jnp.take_along_axis(logp, jnp.maximum(col, 0)[None, ..., None], -1)[..., 0]  # [k, B, T]
            return jnp.sum(nll * in_u, (1, 2)), jnp.exp(jnp.max(logp, -1))

        nll, conf = jax.lax.map(at, grid)  # [G, k], [G, k, B, T]
        return nll.T, jnp.moveaxis(conf, 0, -1), correct, valid  # [k, G], [k, B, T, G]

    nll_sum = 0.0
    confs, corrects = [[] for _ in range(k)], [[] for _ in range(k)]
    records = np.asarray(records)[:max_records]
    for i in range(0, len(records), batch_size):
        rows = records[i:i + batch_size]
        b = store.windows(rows, np.zeros(len(rows), np.int64), store.seq_len)
        nll, conf, correct, valid = jax.device_get(batch_stats(hs, bs, *(jnp.asarray(b[x]) for x in
                                                                         ("hidden", "tokens", "labels"))))
        nll_sum = nll_sum + nll
        for j in range(k):
            confs[j].append(conf[j][valid[j]])
            corrects[j].append(correct[j][valid[j]])
    temps, report = [], []
    for j in range(k):
        conf, correct = np.concatenate(confs[j]), np.concatenate(corrects[j]).astype(np.float64)
        loss = top1_log_loss(conf, correct) if len(correct) else np.zeros(len(GRID))
        g1 = int(np.argmin(np.abs(GRID - 1.0)))
        g = int(np.argmin(loss)) if len(correct) else g1
        before_rows, before = reliability(conf[:, g1], correct)
        after_rows, after = reliability(conf[:, g], correct)
        temps.append(float(GRID[g]))
        report.append({"draft": j + 1, "temperature": round(float(GRID[g]), 3), "anchors": int(len(correct)),
                       "accuracy": round(float(correct.mean()), 4) if len(correct) else 0.0,
                       "top1_log_loss": round(float(loss[g]), 4), "top1_log_loss_at_1": round(float(loss[g1]), 4),
                       "nll_temperature": round(float(GRID[int(np.argmin(nll_sum[j]))]), 3),
                       "ece_before": before, "ece_after": after, "reliability_before": before_rows,
                       "reliability_after": after_rows})
    return {"temperature": temps, "per_draft": report}
