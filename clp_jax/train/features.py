"""What training reads besides the records: cached backbone hidden states and the scored vocabulary."""

from __future__ import annotations

import os
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from clp_jax.train import data as data_lib
from clp_jax.train.step import backbone_hidden


def cached_hidden_fn(model, source, batch_size: int = 8, progress: bool = True, path: str | None = None):
    """Backbone hidden states of every record, computed once: D*4 bytes per token in fp32 (3.5 KB for
    the 0.5B backbone). With `path`, they are stored there as .npy and memory-mapped by later runs."""
    if path is not None and os.path.exists(path):
        table = np.load(path, mmap_mode="r")
        if table.shape[0] == len(source):
            return lambda idx, batch: jnp.asarray(table[idx])
    fn = jax.jit(backbone_hidden)
    parts = []
    for start in tqdm(range(0, len(source), batch_size), desc="backbone hidden states", disable=not progress):
        batch = data_lib.get_batch(source, np.arange(start, min(start + batch_size, len(source))))
        parts.append(np.asarray(fn(model, jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"]))))
    table = np.concatenate(parts)  # [N, T, D]
    if path is not None:
        tmp = path + ".partial.npy"
        np.save(tmp, table)
        os.replace(tmp, path)  # whole or absent
    return lambda idx, batch: jnp.asarray(table[idx])


def corpus_vocabulary(dc: data_lib.DataConfig, tokenizer, eos_token_ids, train_src, size: int) -> np.ndarray:
    """Token ids scored in training: the `size` most frequent in the corpus files, every token of the
    training rows, and the end-of-turn tokens (FastMTP-style vocabulary compression)."""
    counts = Counter(data_lib.token_stream(tokenizer, data_lib.source_files(dc.sources, dc.max_files, dc.seed)))
    ids = {t for t, _ in counts.most_common(size)} | set(eos_token_ids)
    for i in range(len(train_src)):
        ids.update(np.asarray(train_src[i]["tokens"]).tolist())
    return np.asarray(sorted(ids), np.int32)
