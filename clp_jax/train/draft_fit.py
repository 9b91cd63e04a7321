"""Fitting drafters (draft layer or Medusa heads) and the CLP on teacher-forced feature caches.

Targets are the backbone's own greedy predictions y (see teacher_forced.py). Draft step / head j,
anchored at position n, predicts y_{n+j} (the token at n+1+j); for the draft layer, the training-time
test unrolls the k steps exactly as decoding chains them (draft_layer.DraftLayer.unrolled), so step j
sees its own earlier outputs. Losses are cross-entropy over the drafters' vocabulary U, head j weighted
`decay**(j-1)`. The CLP learns L* (how many leading drafts equal y) on records the drafters never saw.

Batches are windows of cached records; the step is `jax.jit`-compiled with the batch sharded over the
mesh's `data` axis and the drafter replicated. The backbone is frozen (its embedding, final norm and
output projection are read, never differentiated).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clp_jax.drafting.heads import Heads
from clp_jax.model.numerics import prefix_len

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitConfig:
    steps: int = 1000
    batch_size: int = 16  # windows per step
    window: int = 256  # positions per window
    learning_rate: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    head_decay: float = 0.8  # head / step j weighted decay**(j-1)
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"FitConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if not self.learning_rate > 0:
            raise ValueError(f"FitConfig.learning_rate must be > 0, got {self.learning_rate}.")


def _draft_states(heads: Heads, backbone, hidden, tokens, k: int) -> jax.Array:
    """[k, B, T, D]: entry [j-1, :, p] scores y_{p+1} for draft j (the draft layer: anchored at
    p-j+1; Medusa: head j read at p-j+1, shifted so both line up with the same targets)."""
    if heads.drafter is not None:
        return heads.drafter.unrolled(backbone, hidden, tokens, k)
    t1e = backbone.embed(tokens).astype(hidden.dtype) if heads.cfg.conditioned else None  # x_{n+1} at n
    if t1e is not None:
        t1e = jnp.concatenate([t1e[:, 1:], t1e[:, -1:]], axis=1)
    states = heads.mtp(hidden, t1e, k)  # [B, T, k, D] head j at n scores y_{n+j}
    out = []
    for j in range(1, k + 1):  # move head j's state at n to position p = n+j-1
        s = states[:, :, j - 1]
        out.append(jnp.concatenate([jnp.zeros_like(s[:, :j - 1]), s[:, :s.shape[1] - (j - 1)]], axis=1))
    return jnp.stack(out)


def _targets(labels, lengths, k: int, vocab_index):
    """Per draft j: sub-vocabulary targets [k, B, T] (-1 outside U) and validity [k, B, T] (anchor real)."""
    B, T = labels.shape
    nxt = jnp.concatenate([labels[:, 1:], jnp.full((B, 1), -1, labels.dtype)], axis=1)  # y_{p+1}
    pos = jnp.arange(T)[None, :]
    valid_t = (pos + 1 < lengths[:, None]) & (nxt >= 0)
    sub = jnp.where(nxt >= 0, vocab_index[jnp.maximum(nxt, 0)], -1)
    valid = jnp.stack([valid_t & (pos >= j) for j in range(k)])  # anchor p-j >= 0
    return jnp.broadcast_to(sub, (k, B, T)), valid, jnp.broadcast_to(nxt, (k, B, T))


def _logits(backbone, states, vocab):
    kernel = backbone.output_kernel(vocab)  # [U, D]
    return jnp.einsum("...D,UD->...U", states.astype(kernel.dtype), kernel).astype(jnp.float32)


def loss_fn(heads: Heads, backbone, batch: dict, vocab, vocab_index, k: int, decay: float):
    states = _draft_states(heads, backbone, batch["hidden"], batch["tokens"], k)  # [k, B, T, D]
    logits = _logits(backbone, states, vocab)  # [k, B, T, U]
    sub, valid, full = _targets(batch["labels"], batch["lengths"], k, vocab_index)
    in_vocab = valid & (sub >= 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(sub, 0))  # [k, B, T]
    per_head = jnp.sum(ce * in_vocab, axis=(1, 2)) / jnp.maximum(jnp.sum(in_vocab, axis=(1, 2)), 1)
    w = decay ** jnp.arange(k)
    pred = vocab[jnp.argmax(logits, -1)]
    hits, count = jnp.sum((pred == full) & valid, axis=(1, 2)), jnp.sum(valid, axis=(1, 2))
    return jnp.sum(w * per_head) / jnp.sum(w), {"ce": per_head, "agreement": hits / jnp.maximum(count, 1),
                                                "hits": hits, "count": count}


class DraftFitter:
    """Sharded, jitted training of a drafter's parameters (everything else frozen)."""

    def __init__(self, backbone, heads: Heads, vocab: np.ndarray, fc: FitConfig, mesh: Mesh | None = None):
        self.fc, self.k = fc, heads.cfg.k
        self.vocab = jnp.asarray(vocab, jnp.int32)
        index = np.full((backbone.cfg.vocab_size,), -1, np.int32)
        index[np.asarray(vocab)] = np.arange(len(vocab), dtype=np.int32)
        self.vocab_index = jnp.asarray(index)
        self.mesh = mesh or Mesh(np.asarray(jax.devices()), ("data",))
        warmup = min(fc.warmup_steps, fc.steps // 2)
        sched = optax.warmup_cosine_decay_schedule(0.0, fc.learning_rate, warmup, max(fc.steps, warmup + 1),
                                                   fc.learning_rate * 0.05)
        self.opt = optax.chain(optax.clip_by_global_norm(1.0),
                               optax.adamw(sched, weight_decay=fc.weight_decay))
        part = heads.drafter if heads.drafter is not None else heads.mtp
        self.heads = heads
        self.graph, self.params, self.rest = nnx.split(heads, lambda path, x: (
            isinstance(x, nnx.Param) and path[0] in ("drafter", "mtp")), ...)
        del part
        self.params = jax.tree.map(jnp.array, self.params)  # own buffers: the step donates them
        self.bb_graph, self.bb_state = nnx.split(backbone)
        self.opt_state = self.opt.init(self.params)
        self.step_count = 0
        repl = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.params, self.opt_state, self.bb_state = jax.device_put((self.params, self.opt_state, self.bb_state), repl)
        self._step = jax.jit(self._step_impl, donate_argnums=(0, 1))
        self._eval = jax.jit(self._eval_impl)

    def _loss(self, params, bb_state, batch):
        heads = nnx.merge(self.graph, params, self.rest)
        backbone = nnx.merge(self.bb_graph, bb_state)
        return loss_fn(heads, backbone, batch, self.vocab, self.vocab_index, self.k, self.fc.head_decay)

    def _step_impl(self, params, opt_state, bb_state, batch):
        (loss, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(params, bb_state, batch)
        updates, opt_state = self.opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    def _eval_impl(self, params, bb_state, batch):
        return self._loss(params, bb_state, batch)

    def _place(self, batch):
        return jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, self.batch_sharding)

    def step(self, batch) -> dict:
        self.params, self.opt_state, loss, m = self._step(self.params, self.opt_state, self.bb_state,
                                                          self._place(batch))
        self.step_count += 1
        return {"loss": loss, **m}

    def evaluate(self, batches) -> dict:
        """Mean over batches of per-draft agreement with y (full vocabulary) and cross-entropy."""
        hits, count = 0, 0
        for b in batches:
            _, m = jax.device_get(self._eval(self.params, self.bb_state, self._place(b)))
            hits, count = hits + m["hits"], count + m["count"]
        return {"agreement": (np.asarray(hits) / np.maximum(count, 1)).round(4).tolist(),
                "positions": int(np.max(count)) if np.size(count) else 0}

    def trained_heads(self) -> Heads:
        return nnx.merge(self.graph, jax.device_get(self.params), self.rest)


def window_batch(cache: dict, rows: np.ndarray, starts: np.ndarray, window: int) -> dict:
    """Windows [start, start+window) of cached records (hidden as fp32)."""
    idx = starts[:, None] + np.arange(window)[None, :]
    r = rows[:, None]
    hidden = np.stack([np.asarray(cache["hidden"][i, s:s + window]) for i, s in zip(rows, starts)])
    return {"hidden": hidden.astype(np.float32), "tokens": np.asarray(cache["tokens"])[r, idx],
            "labels": np.asarray(cache["labels"])[r, idx],
            "lengths": np.clip(np.asarray(cache["lengths"])[rows] - starts, 0, window).astype(np.int32)}


def sample_windows(cache: dict, step: int, batch_size: int, window: int, seed: int, records: np.ndarray):
    """The batch of step s is a function of s alone: records drawn without replacement per epoch."""
    n = len(records)
    epoch, i = divmod(step * batch_size, n)
    order = np.random.RandomState(seed + epoch).permutation(n)
    pick = records[np.take(order, np.arange(i, i + batch_size), mode="wrap")]
    T = cache["tokens"].shape[1]
    window = min(window, T)
    lengths = np.asarray(cache["lengths"])[pick]
    rng = np.random.RandomState(seed * 7919 + step)
    starts = np.array([rng.randint(0, max(1, min(T, L) - window // 2)) if T > window else 0 for L in lengths])
    starts = np.minimum(starts, max(T - window, 0))
    return window_batch(cache, pick, starts, window)


def fit(fitter: DraftFitter, cache: dict, records: np.ndarray, *, progress: bool = True,
        log_every: int = 50) -> list[dict]:
    from tqdm.auto import tqdm

    fc = fitter.fc
    history = []
    t0 = time.perf_counter()
    bar = tqdm(total=fc.steps, initial=fitter.step_count, desc="fit drafter", unit="step", disable=not progress)
    while fitter.step_count < fc.steps:
        m = fitter.step(sample_windows(cache, fitter.step_count, fc.batch_size, fc.window, fc.seed, records))
        bar.update(1)
        if fitter.step_count % log_every == 0 or fitter.step_count == fc.steps:
            m = jax.device_get(m)
            row = {"step": fitter.step_count, "loss": float(m["loss"]), "agreement": m["agreement"].tolist(),
                   "seconds": time.perf_counter() - t0}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", agree=" ".join(f"{a:.2f}" for a in row["agreement"]))
    bar.close()
    return history


def mask_prompts(cache: dict, prompt_lengths: np.ndarray) -> dict:
    """The cache with labels -1 inside each record's prompt (positions < its prompt length), so that
    held-out agreement on self-distilled records counts only drafts of generated tokens."""
    labels = np.array(cache["labels"])
    labels[np.arange(labels.shape[1])[None, :] < np.asarray(prompt_lengths)[:, None]] = -1
    return {**cache, "labels": labels}


def eval_batches(cache: dict, records: np.ndarray, window: int, batch_size: int):
    """Every record of `records` cut into consecutive windows (whole records, no sampling)."""
    T = cache["tokens"].shape[1]
    window = min(window, T)
    pairs = [(r, s) for r in records for s in range(0, T - window + 1, window)]
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        b = window_batch(cache, np.array([p[0] for p in chunk]), np.array([p[1] for p in chunk]), window)
        if len(chunk) < batch_size:  # pad with empty rows (length 0: nothing counted)
            b = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - len(chunk), 0)]) for k, v in b.items()}
            b["lengths"][len(chunk):] = 0
        yield b


# ---------------------------------------------------------------------- CLP

def chain_correct(heads: Heads, backbone, cache: dict, records: np.ndarray, batch_size: int = 8,
                  first_anchor: np.ndarray | None = None):
    """Per position: h [M, D] and whether each of the k drafts equals y ([M, k] bool), over the real
    positions of `records` (for self-distilled records, teacher forcing is exactly the decode chain).
    `first_anchor` [len(records)]: the first anchor counted per record (a self-distilled record's last
    prompt position, so only the positions decoding anchors at are counted)."""
    k = heads.cfg.k
    vocab = heads.draft_vocab[...] if heads.draft_vocab is not None else jnp.arange(backbone.cfg.vocab_size)
    g, st = nnx.split(heads)
    bg, bs = nnx.split(backbone)

    @jax.jit
    def run(st, bs, hidden, tokens, labels, lengths):
        h, b = nnx.merge(g, st), nnx.merge(bg, bs)
        states = _draft_states(h, b, hidden, tokens, k)  # [k, B, T, D]
        pred = vocab[jnp.argmax(_logits(b, states, vocab), -1)]  # [k, B, T]
        T = tokens.shape[1]
        # draft j anchored at n sits at p = n + j - 1: realign to the anchor n
        ok = []
        for j in range(k):
            pj = jnp.concatenate([pred[j, :, j:], jnp.full((pred.shape[1], j), -2, pred.dtype)], axis=1)
            yj = jnp.concatenate([labels[:, j + 1:], jnp.full((labels.shape[0], j + 1), -3, labels.dtype)], axis=1)
            ok.append(pj == yj)
        ok = jnp.stack(ok, -1)  # [B, T, k]
        valid = jnp.arange(T)[None, :] + 1 < lengths[:, None]
        return ok, valid

    hs, oks = [], []
    T = cache["tokens"].shape[1]
    for i in range(0, len(records), batch_size):
        rows = records[i:i + batch_size]
        b = window_batch(cache, rows, np.zeros(len(rows), np.int64), T)
        ok, valid = jax.device_get(run(st, bs, *(jnp.asarray(b[x]) for x in ("hidden", "tokens", "labels", "lengths"))))
        if first_anchor is not None:
            valid = valid & (np.arange(T)[None, :] >= np.asarray(first_anchor)[i:i + batch_size, None])
        hs.append(b["hidden"][valid])
        oks.append(ok[valid])
    return np.concatenate(hs), np.concatenate(oks)


def fit_clp(heads: Heads, h: np.ndarray, correct: np.ndarray, *, steps: int = 400, lr: float = 3e-3,
            seed: int = 0) -> dict:
    """Fits the CLP (Linear d -> k+1) on L* = prefix_len(correct); returns train/held-out figures and
    the confidence p (for `--clp-confidence`) whose held-out wrong-commit rate is at most 2%."""
    k = heads.cfg.k
    labels = np.asarray(prefix_len(jnp.asarray(correct)))
    n = len(labels)
    perm = np.random.RandomState(seed).permutation(n)
    tr, te = perm[: n * 4 // 5], perm[n * 4 // 5:]
    counts = np.bincount(labels[tr], minlength=k + 1).astype(np.float64)
    g, params, rest = nnx.split(heads.clp, nnx.Param, ...)
    opt = optax.adam(lr)
    opt_state = opt.init(params)
    X, Y = jnp.asarray(h[tr], jnp.float32), jnp.asarray(labels[tr])

    def loss(p):
        logits = nnx.merge(g, p, rest)(X)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, Y))

    @jax.jit
    def step(p, s):
        l, gr = jax.value_and_grad(loss)(p)
        u, s = opt.update(gr, s, p)
        return optax.apply_updates(p, u), s, l

    for _ in range(steps):
        params, opt_state, l = step(params, opt_state)
    nnx.update(heads.clp, params)
    logits = np.asarray(heads.clp(jnp.asarray(h[te], jnp.float32)))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    at_least = np.flip(np.cumsum(np.flip(probs, -1), -1), -1)  # P(L* >= l)
    true = labels[te]
    report = {"train_label_share": (counts / counts.sum()).tolist(), "train_loss": float(l),
              "heldout_accuracy_argmax": float(np.mean(np.argmax(logits, -1) == true)), "thresholds": []}
    chosen = None
    for p in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        n_acc = np.sum(at_least[:, 1:] >= p, axis=-1)
        wrong = np.sum(np.maximum(n_acc - true, 0))
        rate = float(wrong / max(np.sum(n_acc), 1))
        report["thresholds"].append({"p": p, "heads_committed_per_step": float(np.mean(n_acc)),
                                     "wrong_commit_rate": rate})
        if chosen is None and rate <= 0.02:
            chosen = p
    n_arg = np.argmax(logits, -1)
    report["argmax"] = {"heads_committed_per_step": float(np.mean(n_arg)),
                        "wrong_commit_rate": float(np.sum(np.maximum(n_arg - true, 0)) / max(np.sum(n_arg), 1))}
    report["clp_confidence"] = chosen if chosen is not None else 0.95
    return report
