"""Teacher-forced training data for drafters: one trunk pass per record, cached on disk.

For each record of tokens x [T] the frozen backbone gives, at every position p, its final-normed hidden
state h_p and its own greedy prediction y_p = argmax LM(h_p) of the token at p+1. Drafters learn to
predict y (the backbone's choices, not the corpus text) from h and x: EAGLE's recipe, which reaches
90-95% of the benefit of token-by-token self-distillation for one prefill pass per record.

The cache is a directory of `.npy` files, memory-mapped when read: `hidden.npy` [N, T, D] bf16 (stored as uint16 bits),
`labels.npy` [N, T] int32, `tokens.npy` [N, T] int32, `lengths.npy` [N] int32 (positions >= length are
padding), and `meta.json`. Records come from packed corpus text (every position real) or from
self-distilled prompts + greedy continuations (left-aligned, padded).

Large caches are built in shards (`build_sharded`: one sub-directory per range of records, each written
atomically), so a killed feature job resumes at the first missing shard and loses at most one shard's work;
`load_cache` reads a sharded directory as one cache.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)

FILES = ("hidden.npy", "labels.npy", "tokens.npy", "lengths.npy")


def pad_records(rows: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned rows cut or padded to `length`: (tokens [N, length] int32, lengths [N] int32)."""
    tokens = np.full((len(rows), length), pad_id, np.int32)
    lengths = np.zeros((len(rows),), np.int32)
    for i, r in enumerate(rows):
        r = list(r)[:length]
        tokens[i, :len(r)] = r
        lengths[i] = len(r)
    return tokens, lengths


def build_cache(model, tokens: np.ndarray, lengths: np.ndarray, out_dir: str, *, batch_size: int = 8,
                progress: bool = True) -> str:
    """Runs the trunk over every record and writes the cache (see the module docstring) to out_dir.

    Written to `out_dir + '.partial'` and renamed at the end, so a killed run never leaves a cache that
    looks complete.
    """
    from tqdm.auto import tqdm

    N, T = tokens.shape
    D = model.cfg.hidden_size
    tmp = out_dir.rstrip("/") + ".partial"
    os.makedirs(tmp, exist_ok=True)
    hidden = np.lib.format.open_memmap(os.path.join(tmp, "hidden.npy"), "w+", np.uint16, (N, T, D))  # bf16 bits
    labels = np.lib.format.open_memmap(os.path.join(tmp, "labels.npy"), "w+", np.int32, (N, T))
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, toks, lens):
        m = nnx.merge(graphdef, state)
        pos = jnp.broadcast_to(jnp.arange(toks.shape[1], dtype=jnp.int32), toks.shape)
        valid = pos < lens[:, None]
        h, _ = m(toks, pos, None, kv_valid=valid)  # [B, T, D]
        y = jnp.argmax(m.logits(h), axis=-1).astype(jnp.int32)  # [B, T]
        return h.astype(jnp.bfloat16), jnp.where(valid, y, -1)

    for s in tqdm(range(0, N, batch_size), desc="teacher-forced features", unit="batch", disable=not progress):
        e = min(s + batch_size, N)
        toks, lens = tokens[s:e], lengths[s:e]
        if e - s < batch_size:  # one compiled shape: pad the last batch
            toks = np.concatenate([toks, np.repeat(toks[-1:], batch_size - (e - s), 0)])
            lens = np.concatenate([lens, np.repeat(lens[-1:], batch_size - (e - s), 0)])
        h, y = jax.device_get(run(state, jnp.asarray(toks), jnp.asarray(lens)))
        hidden[s:e] = np.asarray(h[:e - s]).view(np.uint16)
        labels[s:e] = y[:e - s]
    hidden.flush()
    labels.flush()
    del hidden, labels
    np.save(os.path.join(tmp, "tokens.npy"), tokens.astype(np.int32))
    np.save(os.path.join(tmp, "lengths.npy"), lengths.astype(np.int32))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"records": int(N), "seq_len": int(T), "hidden_size": int(D),
                   "positions": int(lengths.sum())}, f)
    if os.path.exists(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log.info("teacher-forced cache: %d records x %d tokens -> %s", N, T, out_dir)
    return out_dir


def _shard_name(start: int, end: int) -> str:
    return f"records_{start:06d}_{end:06d}"


def build_sharded(model, tokens: np.ndarray, lengths: np.ndarray, out_dir: str, *, shard_records: int = 128,
                  batch_size: int = 8, progress: bool = True) -> str:
    """`build_cache` over ranges of `shard_records` records, skipping shards already complete.

    Each shard is its own cache under out_dir (`records_<start>_<end>`); an existing single cache of the
    first records (an older unsharded run) can be moved in under the matching shard name and is reused.
    """
    from tqdm.auto import tqdm

    N = len(tokens)
    os.makedirs(out_dir, exist_ok=True)
    done = {name for name in os.listdir(out_dir) if os.path.exists(os.path.join(out_dir, name, "meta.json"))}
    ranges, start = [], 0
    for name in sorted(done):  # reuse complete shards whatever their size, then fill the rest
        a, b = (int(x) for x in name.split("_")[1:])
        if a == start and b <= N:
            ranges.append((a, b))
            start = b
    while start < N:
        ranges.append((start, min(start + shard_records, N)))
        start = ranges[-1][1]
    todo = [r for r in ranges if _shard_name(*r) not in done]
    for a, b in tqdm(todo, desc="feature shards", unit="shard", disable=not progress):
        build_cache(model, tokens[a:b], lengths[a:b], os.path.join(out_dir, _shard_name(a, b)),
                    batch_size=batch_size, progress=False)
        log.info("feature shard %d-%d of %d records done", a, b, N)
    with open(os.path.join(out_dir, "shards.json"), "w") as f:
        json.dump({"shards": [_shard_name(*r) for r in ranges], "records": int(N)}, f)
    return out_dir


class ShardedHidden:
    """Row-indexable view over the shards' memory-mapped hidden states: `h[i, a:b]` reads one shard."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.starts[-1]),) + tuple(self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        row, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        row = int(row)
        if not 0 <= row < self.shape[0]:
            raise IndexError(f"record {row} outside 0..{self.shape[0] - 1}")
        s = int(np.searchsorted(self.starts, row, side="right") - 1)
        return self.parts[s][(row - self.starts[s],) + tuple(rest)]


def load_cache(path: str) -> dict[str, np.ndarray]:
    """The cache's arrays, memory-mapped (hidden stays on disk until indexed); a sharded directory
    (`build_sharded`) reads as one cache: small arrays concatenated, hidden a `ShardedHidden` view."""
    index = os.path.join(path, "shards.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = [load_cache(os.path.join(path, name)) for name in json.load(f)["shards"]]
        out = {k: np.concatenate([np.asarray(s[k]) for s in shards]) for k in ("labels", "tokens", "lengths")}
        out["hidden"] = ShardedHidden([s["hidden"] for s in shards])
        return out
    missing = [f for f in FILES if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"{path} is not a teacher-forced feature cache (missing {missing}); "
                                "build it with clp_jax.train.teacher_forced.build_cache.")
    out = {f[:-4]: np.load(os.path.join(path, f), mmap_mode="r") for f in FILES}
    out["hidden"] = out["hidden"].view(ml_dtypes.bfloat16)  # stored as bf16 bits (.npy has no bf16)
    return out


def label_vocabulary(labels: np.ndarray, size: int, always: Sequence[int] = ()) -> np.ndarray:
    """The `size` most frequent backbone predictions (plus `always`), sorted: the drafters' vocabulary."""
    flat = labels[labels >= 0].ravel()
    counts = np.bincount(flat)
    top = np.argsort(-counts, kind="stable")[:size]
    top = top[counts[top] > 0]
    return np.unique(np.concatenate([top, np.asarray(always, np.int64)])).astype(np.int32)
