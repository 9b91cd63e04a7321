"""Room: continuous batching on the host; drives Decoder.start/refill/advance, touches no state inside.

A fixed batch of rows kept full by prefilling the next prompts into finished rows.

`Decoder.generate` decodes one batch until its slowest row ends, so the rows that stop early (EOS) sit idle:
on 32 chat prompts with 192 new tokens a quarter of the row-steps produced nothing. `stream` instead runs
the loop a few steps at a time, hands back each row as it finishes (tokens, and the hidden states and top-K
an `ar` decoder records) and refills finished rows with the next prompts (`Decoder.refill`: one prefill of
just those rows, scattered into the running batch). Self-distillation (clp_jax/train/data.py) and the
generation benchmark (clp_jax/bench/generation.py) read it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Sequence

import jax
import numpy as np

from clp_jax.decode.decoder import Decoder, _bucket


@dataclasses.dataclass
class Finished:
    """One prompt's continuation; the recordings cover positions 0 .. len(prompt + tokens) - 1."""

    index: int  # the prompt's index in the list given to `stream`
    tokens: list[int]  # generated tokens (EOS included when hit)
    hidden: np.ndarray | None = None  # [L, D] bf16 (DecodeConfig.record_hidden)
    topk_ids: np.ndarray | None = None  # [L, K] (DecodeConfig.record_topk)
    topk_probs: np.ndarray | None = None  # [L, K]


@dataclasses.dataclass
class StreamStats:
    """What a stream spent: seconds (compilation excluded, and counted apart), refills, and the loop's
    row-steps (batch x steps) against the tokens they produced (the first token of each prompt comes from
    its prefill)."""

    seconds: float = 0.0
    compile_seconds: float = 0.0
    refills: int = 0
    row_steps: int = 0
    tokens: int = 0

    @property
    def occupancy(self) -> float:
        return self.tokens / max(self.row_steps, 1)


def stream(decoder: Decoder, prompts: Sequence[Sequence[int]], batch_size: int, *, chunk_steps: int = 8,
           refill_rows: int = 0, seed: int = 0, stats: StreamStats | None = None) -> Iterator[Finished]:
    """Decodes every prompt, `batch_size` rows at a time, yielding each as its row finishes (not in order).

    Every `chunk_steps` loop steps the finished rows are handed back; once `refill_rows` of them are free
    (default: an eighth of the batch, at least 2) or every row has finished, they are refilled with the next
    prompts in order. The cache is sized for the longest prompt of the list, so one loop program serves.
    """
    if not prompts:
        return
    decoder.check_prompts(prompts)
    B = _bucket(min(batch_size, len(prompts)), 1)
    refill_rows = refill_rows or max(2, B // 8)
    stats = stats if stats is not None else StreamStats()
    capacity = decoder.capacity_for(prompts)
    c0, t0 = decoder.compile_seconds, time.perf_counter()
    owner = list(range(min(B, len(prompts))))  # prompt index per row; -1 = free
    nxt = len(owner)
    st = decoder.start([prompts[i] for i in owner], seed=seed, capacity=capacity)
    owner += [-1] * (B - len(owner))
    steps_before = 0
    while True:
        st = decoder.advance(st, chunk_steps)
        done, length, plen, steps = jax.device_get((st.done, st.length, st.prompt_len, st.steps))
        stats.row_steps += B * (int(steps) - steps_before)
        steps_before = int(steps)
        finished = [r for r in range(B) if owner[r] >= 0 and done[r]]
        if finished:
            for row in _harvest(decoder, st, finished, owner, length, plen):
                stats.tokens += len(row.tokens)
                yield row
            for r in finished:
                owner[r] = -1
        free = [r for r in range(B) if owner[r] < 0]
        if nxt < len(prompts) and (len(free) >= refill_rows or len(free) == B):
            take = free[:len(prompts) - nxt]
            st = decoder.refill(st, take, [prompts[nxt + j] for j in range(len(take))])
            for j, r in enumerate(take):
                owner[r] = nxt + j
            nxt += len(take)
            stats.refills += 1
        elif all(o < 0 for o in owner):
            break
    stats.compile_seconds += decoder.compile_seconds - c0
    stats.seconds += time.perf_counter() - t0 - (decoder.compile_seconds - c0)


def _harvest(decoder: Decoder, st, rows: list[int], owner: list[int], length, plen) -> Iterator[Finished]:
    """The finished rows' tokens and recordings, copied out before the state is donated to the next call."""
    idx = np.asarray(rows)
    buf = np.asarray(jax.device_get(st.buf[idx]))
    recs = {}
    for name in ("hidden", "topk_ids", "topk_probs"):
        arr = getattr(st, f"rec_{name}")
        if arr.shape[1]:
            recs[name] = np.asarray(jax.device_get(arr[idx]))
    for j, r in enumerate(rows):
        L = int(length[r])
        yield Finished(owner[r], buf[j, int(plen[r]):L].tolist(), **{k: v[j, :L].copy() for k, v in recs.items()})
