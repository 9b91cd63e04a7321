"""The feature store: what drafters train on, computed once by the frozen backbone and kept on disk.

A store is a directory of shards, each a range of records of one source (`prompts.KINDS`: teacher-forced
corpus text, or self-distilled code completions, code requests and chat requests). Per shard, memory-
mapped `.npy` files over N records of T positions:

  tokens [N, T] int32          the record (prompt + the backbone's greedy continuation, or corpus text)
  hidden [N, T, D] bf16 bits   the trunk's final-normed hidden state h_p of every position
  labels [N, T] int32          the backbone's greedy choice y_p for the token at p+1; -1 = not a target
  lengths [N], prompt_lengths [N] int32, and, with soft labels, soft_ids / soft_probs [N, T, K]
                               (the top-K of the backbone's next-token distribution at p)

Two writers fill it. Corpus records: one trunk pass per record (`teacher_forced`), every position a
target. Self-distilled records: the `ar` decoder records the hidden states and the top-K while it
generates (`self_distilled`), so they cost one pass; only the anchors of generated tokens are targets
(positions prompt_length-1 .. length-2), the prompt is context. Drafters learn y, not the text.

Each shard is written to `<name>.partial` and renamed when complete, so a killed job loses at most the
shard in progress and resumes at the first missing one; on a pod each process writes its own shards.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from clp_jax.model.numerics import top_k_probs

log = logging.getLogger(__name__)

ARRAYS = ("tokens", "hidden", "labels", "lengths", "prompt_lengths")
SOFT = ("soft_ids", "soft_probs")
META = "meta.json"


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Records [start, stop) of one source's input list."""

    kind: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.start:06d}_{self.stop:06d}"


def input_digest(rows: Sequence[Sequence[int]]) -> str:
    """A short hash of a shard's input token rows (a resumed store checks its inputs did not change)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(np.asarray(r, np.int32).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def plan_shards(counts: dict[str, int], shard_records: int, done: Sequence[str] = ()) -> list[ShardSpec]:
    """Shards covering records [0, counts[kind]) of each kind, reusing complete shards (`done` names)
    that chain from 0, and interleaved across kinds in proportion, so a partly built store is a mix."""
    per_kind = {}
    for kind, n in counts.items():
        have = sorted((int(a), int(b)) for k, a, b in (d.rsplit("_", 2) for d in done) if k == kind)
        specs, start = [], 0
        for a, b in have:
            if a == start and b <= n:
                specs.append(ShardSpec(kind, a, b))
                start = b
        while start < n:
            specs.append(ShardSpec(kind, start, min(start + shard_records, n)))
            start = specs[-1].stop
        per_kind[kind] = specs
    total = sum(len(v) for v in per_kind.values())
    order = []
    for kind, specs in per_kind.items():  # shard i of a kind with m shards sits at (i + 0.5) / m
        order += [((i + 0.5) / len(specs), list(counts).index(kind), s) for i, s in enumerate(specs)]
    return [s for _, _, s in sorted(order)][:total]


def write_shard(path: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Writes one shard's arrays and meta.json atomically (a `.partial` directory renamed at the end)."""
    tmp = path.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, arr in arrays.items():
        if name == "hidden":
            arr = np.asarray(arr).astype(ml_dtypes.bfloat16).view(np.uint16)
        np.save(os.path.join(tmp, f"{name}.npy"), arr)
    n = len(arrays["tokens"])
    meta = {**meta, "records": int(n), "seq_len": int(arrays["tokens"].shape[1]),
            "positions": int((arrays["labels"] >= 0).sum())}
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- writers

def padded(rows: Sequence[Sequence[int]], seq_len: int) -> np.ndarray:
    """Token rows left-aligned in [N, seq_len] int32, zero after each row."""
    tokens = np.zeros((len(rows), seq_len), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return tokens


def teacher_forced(model, tokens: np.ndarray, lengths: np.ndarray, *, batch_size: int = 8, topk: int = 0,
                   progress: bool = False) -> dict[str, np.ndarray]:
    """One trunk pass per record: hidden states, greedy labels (and the top-`topk` distribution) at every
    real position. tokens [N, T] left-aligned, lengths [N]. Records are passed in batches of similar length,
    each at its longest record rounded up to a multiple of 64 (a store of short chat records costs what its
    tokens cost, not T per record); one program per such length."""
    N, T = tokens.shape
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=(3,))
    def run(state, toks, lens, width):
        m = nnx.merge(graphdef, state)
        toks = toks[:, :width]
        pos = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), toks.shape)
        valid = pos < lens[:, None]
        h, _ = m(toks, pos, None, kv_valid=valid)  # [B, W, D]
        logits = m.logits(h).astype(jnp.float32)  # [B, W, V]
        y = jnp.where(valid, jnp.argmax(logits, -1).astype(jnp.int32), -1)
        if topk:  # (XLA:CPU keeps top_k a partial sort only while its ids are not sliced: no y = ids[..., 0])
            probs, ids = top_k_probs(logits, topk)
        else:
            probs, ids = jnp.zeros((*toks.shape, 0)), jnp.zeros((*toks.shape, 0), jnp.int32)
        return h.astype(jnp.bfloat16), y, ids, probs.astype(jnp.float16)

    out = {"hidden": np.zeros((N, T, model.cfg.hidden_size), ml_dtypes.bfloat16),
           "labels": np.full((N, T), -1, np.int32)}
    if topk:
        out.update(soft_ids=np.zeros((N, T, topk), np.int32), soft_probs=np.zeros((N, T, topk), np.float16))
    order = np.argsort(lengths, kind="stable")
    for s in tqdm(range(0, N, batch_size), desc="teacher-forced features", disable=not progress):
        idx = order[s:s + batch_size]
        if len(idx) < batch_size:  # one compiled batch size: pad the last batch
            idx = np.concatenate([idx, np.repeat(idx[-1:], batch_size - len(idx))])
        width = min(T, -(-max(int(lengths[idx].max()), 1) // 64) * 64)
        h, y, ids, probs = jax.device_get(run(state, jnp.asarray(tokens[idx]), jnp.asarray(lengths[idx]), width))
        real = idx[:min(batch_size, N - s)]
        n = len(real)
        out["hidden"][real, :width], out["labels"][real, :width] = h[:n], y[:n]
        if topk:
            out["soft_ids"][real, :width], out["soft_probs"][real, :width] = ids[:n], probs[:n]
    # the last real position predicts a token outside the record: no target
    out["labels"][np.arange(N), np.maximum(lengths - 1, 0)] = -1
    out.update(tokens=tokens.astype(np.int32), lengths=lengths.astype(np.int32),
               prompt_lengths=np.zeros((N,), np.int32))
    return out


def self_distilled(stream: Callable, prompts: Sequence[Sequence[int]], seq_len: int, *, topk: int = 0
                   ) -> dict[str, np.ndarray]:
    """Greedy continuations of `prompts` with the hidden states the decoder recorded while generating.
    `stream(prompts)` yields `decode.batching.Finished` rows in any order (the continuous batching of an
    `ar` Decoder with record_hidden, record_topk=topk); records keep prompt order."""
    rows: list = [None] * len(prompts)
    for f in stream(prompts):
        rows[f.index] = f
    return distilled(prompts, rows, seq_len, topk=topk)


def distilled(prompts: Sequence[Sequence[int]], rows: Sequence, seq_len: int, *, topk: int = 0
              ) -> dict[str, np.ndarray]:
    """Store arrays of self-distilled records: prompt i and its finished row `rows[i]` (tokens, recorded
    hidden [L, D] and top-K [L, K]). Only the anchors of generated tokens are targets."""
    N, D = len(prompts), rows[0].hidden.shape[-1]
    out = {"tokens": np.zeros((N, seq_len), np.int32), "labels": np.full((N, seq_len), -1, np.int32),
           "hidden": np.zeros((N, seq_len, D), ml_dtypes.bfloat16),
           "lengths": np.zeros((N,), np.int32), "prompt_lengths": np.zeros((N,), np.int32)}
    if topk:
        out.update(soft_ids=np.zeros((N, seq_len, topk), np.int32),
                   soft_probs=np.zeros((N, seq_len, topk), np.float16))
    for i, row in enumerate(rows):
        seq = (list(prompts[i]) + row.tokens)[:seq_len]
        L, P = len(seq), len(prompts[i])
        out["tokens"][i, :L] = seq
        out["lengths"][i], out["prompt_lengths"][i] = L, P
        # the state of the last token was never computed (nothing followed it): L-1 states are real
        out["hidden"][i, :L - 1] = row.hidden[:L - 1]
        anchors = np.arange(P - 1, L - 1)  # h_p of these positions chose the generated token at p+1
        out["labels"][i, anchors] = np.asarray(seq, np.int32)[anchors + 1]
        if topk:
            out["soft_ids"][i, anchors] = row.topk_ids[anchors]
            out["soft_probs"][i, anchors] = row.topk_probs[anchors]
    return out


# ---------------------------------------------------------------------- continuations

CONTINUATIONS_FORMAT = 2  # 2: a content digest in the meta


def _content_digest(tokens: np.ndarray, lengths: np.ndarray, prompt_lengths: np.ndarray) -> str:
    return input_digest([tokens, lengths, prompt_lengths])


def save_continuations(path: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Keeps what a self-distilled shard cost to generate: each record's tokens (prompt + greedy continuation),
    ragged and compressed (~50 KB per 64 records, small enough for a repository), with `meta` (inputs
    digest, backbone, generation settings) and a digest of the content. `from_continuations` rebuilds the
    whole shard from it with one teacher-forced pass. Written atomically."""
    lengths = np.asarray(arrays["lengths"], np.int32)
    prompt_lengths = np.asarray(arrays["prompt_lengths"], np.int32)
    flat = np.concatenate([arrays["tokens"][i, :n] for i, n in enumerate(lengths)]).astype(np.int32)
    meta = {**meta, "format": CONTINUATIONS_FORMAT, "records": int(len(lengths)),
            "generated_tokens": int((lengths - prompt_lengths).sum()),
            "content": _content_digest(flat, lengths, prompt_lengths)}
    tmp = path[:-len(".npz")] + ".partial.npz"
    np.savez_compressed(tmp, tokens=flat, lengths=lengths, prompt_lengths=prompt_lengths,
                        meta=np.asarray(json.dumps(meta, sort_keys=True)))
    os.replace(tmp, path)


class StaleContinuations(ValueError):
    """A kept continuations file that cannot be used: unreadable, corrupted, or made from other inputs."""


def load_continuations(path: str, expect: dict, prompts: Sequence[Sequence[int]] | None = None
                       ) -> dict[str, np.ndarray]:
    """The records of a continuations file (tokens flat, lengths, prompt_lengths). Raises StaleContinuations
    (saying why) for a file that does not read, whose content does not match its digest, that was written
    for other inputs, another backbone or other settings (`expect`: the meta it must carry), or whose
    prompts differ from `prompts`."""
    try:
        with np.load(path) as f:
            out = {k: np.asarray(f[k]) for k in ("tokens", "lengths", "prompt_lengths")}
            meta = json.loads(str(f["meta"]))
    except Exception as e:  # a truncated zip, a missing member, bad JSON: all mean "cannot be used"
        raise StaleContinuations(f"{path} does not read ({type(e).__name__}: {e})") from e
    wrong = sorted(k for k, v in expect.items() if meta.get(k) != v)
    if wrong:
        raise StaleContinuations(f"{path} was generated with other {', '.join(wrong)} "
                                 f"({', '.join(f'{k}={meta.get(k)!r}' for k in wrong)}; this run has "
                                 f"{', '.join(f'{k}={expect[k]!r}' for k in wrong)})")
    lengths, plens = out["lengths"], out["prompt_lengths"]
    if ("content" in meta and meta["content"] != _content_digest(out["tokens"], lengths, plens)) or \
            int(lengths.sum()) != len(out["tokens"]) or np.any(plens > lengths):
        raise StaleContinuations(f"{path} is corrupted (its content does not match its digest)")
    if prompts is not None:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        if len(prompts) != len(lengths) or any(
                int(plens[i]) != len(p) or not np.array_equal(out["tokens"][starts[i]:starts[i] + len(p)], p)
                for i, p in enumerate(prompts)):
            raise StaleContinuations(f"{path} holds other prompts than this shard's")
    return out


def continuations_summary(directory: str) -> dict:
    """Records and generated tokens per kind of the continuations files in `directory` (their meta only)."""
    out: dict[str, dict] = {}
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if not name.endswith(".npz") or name.endswith(".partial.npz"):
            continue
        try:
            with np.load(os.path.join(directory, name)) as f:
                meta = json.loads(str(f["meta"]))
                n = int(meta.get("generated_tokens", (f["lengths"] - f["prompt_lengths"]).sum()))
        except Exception:  # noqa: BLE001 - a damaged file is reported, and regenerated by the data job
            out.setdefault("unreadable", {"files": 0})["files"] += 1
            continue
        kind = out.setdefault(meta.get("kind", "?"), {"files": 0, "records": 0, "generated_tokens": 0})
        kind["files"] += 1
        kind["records"] += int(meta.get("records", 0))
        kind["generated_tokens"] += n
    return out


def from_continuations(model, records: dict[str, np.ndarray], seq_len: int, *, batch_size: int = 8, topk: int = 0,
                       progress: bool = False) -> dict[str, np.ndarray]:
    """A self-distilled shard from its kept tokens: one teacher-forced pass gives the hidden states and the
    top-K that the recording decoder gave (tests/test_feature_store.py), the labels are the generated tokens,
    and only the anchors of generated tokens are targets, as in `self_distilled`."""
    lengths, prompt_lengths = records["lengths"], records["prompt_lengths"]
    N = len(lengths)
    tokens = padded(np.split(records["tokens"], np.cumsum(lengths)[:-1]), seq_len)
    out = teacher_forced(model, tokens, lengths, batch_size=batch_size, topk=topk, progress=progress)
    labels = np.full((N, seq_len), -1, np.int32)
    for i, (P, L) in enumerate(zip(prompt_lengths, lengths)):
        anchors = np.arange(P - 1, L - 1)  # h_p of these positions chose the generated token at p+1
        labels[i, anchors] = tokens[i, anchors + 1]
        out["hidden"][i, L - 1:] = 0  # the recording decoder never computed the last token's state
    if topk:
        off = labels < 0
        out["soft_ids"][off], out["soft_probs"][off] = 0, 0
    out.update(labels=labels, prompt_lengths=prompt_lengths.astype(np.int32))
    return out


# ---------------------------------------------------------------------- reading

class Rows:
    """Row-indexable view over per-shard memory-mapped arrays: `x[i]` or `x[i, a:b]` reads one shard."""

    def __init__(self, parts: Sequence[np.ndarray], view=None):
        self.parts, self.view = list(parts), view
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.starts[-1]),) + tuple(self.parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        row, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        row = int(row)
        if not 0 <= row < self.shape[0]:
            raise IndexError(f"record {row} outside 0..{self.shape[0] - 1}")
        s = int(np.searchsorted(self.starts, row, side="right") - 1)
        out = self.parts[s][(row - self.starts[s],) + tuple(rest)]
        return out.view(self.view) if self.view is not None else out


class FeatureStore:
    """The complete shards of a store directory, read as one table of records (hidden states stay on disk
    until indexed). `kinds` [N] indexes prompts.KINDS; `record_ids` [N] 'kind:index' names each record."""

    def __init__(self, path: str, shards: Sequence[str] | None = None):
        self.path = path
        if shards is None:
            shards = sorted(d for d in os.listdir(path) if os.path.exists(os.path.join(path, d, META)))
        if not shards:
            raise FileNotFoundError(f"{path} holds no complete feature shards; build the store first "
                                    "(train.py writes it before training).")
        self.shards = list(shards)
        metas = []
        for name in self.shards:
            with open(os.path.join(path, name, META)) as f:
                metas.append(json.load(f))
        self.metas = metas
        T = {m["seq_len"] for m in metas}
        if len(T) != 1:
            raise ValueError(f"{path}: shards of different lengths {sorted(T)}; one store holds one seq_len.")
        self.seq_len = T.pop()
        load = lambda name, f: np.load(os.path.join(path, name, f"{f}.npy"), mmap_mode="r")  # noqa: E731
        for f in ("tokens", "labels", "lengths", "prompt_lengths"):
            setattr(self, f, np.concatenate([np.asarray(load(n, f)) for n in self.shards]))
        self.hidden = Rows([load(n, "hidden") for n in self.shards], view=ml_dtypes.bfloat16)
        self.soft_topk = min(m.get("soft_topk", 0) for m in metas)
        self.soft_ids = self.soft_probs = None
        if self.soft_topk:
            self.soft_ids = Rows([load(n, "soft_ids") for n in self.shards])
            self.soft_probs = Rows([load(n, "soft_probs") for n in self.shards])
        from clp_jax.train.prompts import KINDS

        self.kinds = np.concatenate([np.full(m["records"], KINDS.index(m["kind"]), np.int8) for m in metas])
        self.record_ids = [f"{m['kind']}:{m['start'] + i}" for m in metas for i in range(m["records"])]

    def __len__(self) -> int:
        return len(self.tokens)

    def positions(self, records: np.ndarray | None = None) -> int:
        """Training targets (labels >= 0) in `records` (default: all)."""
        labels = self.labels if records is None else self.labels[records]
        return int((labels >= 0).sum())

    def windows(self, rows: np.ndarray, starts: np.ndarray, window: int, soft: bool = False) -> dict:
        """Windows [start, start+window) of records: hidden fp32 [B, W, D], tokens, labels [B, W],
        lengths [B] (real positions of each window), with soft labels when asked for."""
        idx = starts[:, None] + np.arange(window)[None, :]
        r = rows[:, None]
        hidden = np.stack([np.asarray(self.hidden[i, s:s + window]) for i, s in zip(rows, starts)])
        out = {"hidden": hidden.astype(np.float32), "tokens": self.tokens[r, idx], "labels": self.labels[r, idx],
               "lengths": np.clip(self.lengths[rows] - starts, 0, window).astype(np.int32)}
        if soft:
            if not self.soft_topk:
                raise ValueError(f"The feature store {self.path} has no soft labels; rebuild it with "
                                 "data.soft_topk > 0 or train with train.soft_weight = 0.")
            k = self.soft_topk
            out["soft_ids"] = np.stack([np.asarray(self.soft_ids[i, s:s + window, :k]) for i, s in zip(rows, starts)])
            out["soft_probs"] = np.stack([np.asarray(self.soft_probs[i, s:s + window, :k])
                                          for i, s in zip(rows, starts)]).astype(np.float32)
        return out


def split_of(record_id: str, heldout_fraction: float, clp_fraction: float) -> str:
    """'heldout', 'clp' or 'train': a fixed function of the record's id, so growing a store only adds
    records to each split and never moves one (a warm start never evaluates on what it trained on)."""
    u = int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16) / 2 ** 32
    if u < heldout_fraction:
        return "heldout"
    return "clp" if u < heldout_fraction + clp_fraction else "train"


def label_vocabulary(labels: np.ndarray, size: int, always: Sequence[int] = ()) -> np.ndarray:
    """The `size` most frequent backbone predictions (plus `always`), sorted: the drafters' vocabulary."""
    flat = labels[labels >= 0].ravel()
    counts = np.bincount(flat)
    top = np.argsort(-counts, kind="stable")[:size]
    top = top[counts[top] > 0]
    return np.unique(np.concatenate([top, np.asarray(always, np.int64)])).astype(np.int32)
