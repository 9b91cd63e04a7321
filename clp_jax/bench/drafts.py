"""The drafter scored at every position of `ar`'s output, teacher forced.

Decoding sees a draft only where a pass anchors a chain: after a miss the next anchor is the backbone's
correction, after a full chain it is k+1 tokens on, so the bench's first-draft acceptance averages the
positions a chain happened to start from, not the text. This scores draft j of the chain anchored at
every generated position n of `ar`'s greedy output: one backbone pass over prompt + output gives the
trunk's states, the drafter's training-time unroll (`unrolled`, the states decoding would feed) gives its
drafts, and draft j (1-based) counts as right when it equals the output token at n+j+1 given drafts 1..j-1 right.
Also returned: the first draft along the anchors of a plain k-chain `verify` walking the same text (a miss
ends a pass, the next anchor follows the correction), which separates where the anchors fall from how the
decoder computes the drafts.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from clp_jax.train.objectives import chain_correct

WIDTH_STEP = 64  # sequences are padded to a multiple of this: one program per width


@functools.lru_cache(maxsize=8)
def _scorer(bb_def, heads_def, width: int):
    @jax.jit
    def run(bb_state, heads_state, toks, length, prompt_len):  # toks [1, W]
        backbone, heads = nnx.merge(bb_def, bb_state), nnx.merge(heads_def, heads_state)
        pos = jnp.arange(width, dtype=jnp.int32)[None]
        valid = pos < length
        hidden, _ = backbone(toks, pos, None, kv_valid=valid)  # [1, W, D] the trunk's final-normed states
        # anchors of generated tokens: h_n chose the token at n+1 (n = P-1 .. L-2), as the store's records
        anchor = (pos >= prompt_len - 1) & (pos < length - 1)
        labels = jnp.where(anchor, jnp.concatenate([toks[:, 1:], toks[:, :1]], 1), -1)  # [1, W]
        vocab = (heads.draft_vocab[...] if heads.draft_vocab is not None
                 else jnp.arange(backbone.cfg.vocab_size, dtype=jnp.int32))
        batch = {"hidden": hidden, "tokens": toks, "labels": labels}
        ok, anchors = chain_correct(heads, backbone, batch, vocab)  # [1, W, k], [1, W]
        return ok[0], anchors[0]

    return run


def chain_outcomes(backbone, heads, prompt: Sequence[int], output: Sequence[int], k: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """ok [n, k]: whether draft j of the chain anchored at the n-th generated position is right, and
    scored [n, k]: whether its target lies inside the output (n runs over the anchors P-1 .. L-2)."""
    seq = list(prompt) + list(output)
    L, P = len(seq), len(prompt)
    width = -(-L // WIDTH_STEP) * WIDTH_STEP
    toks = np.zeros((1, width), np.int32)
    toks[0, :L] = seq
    bb_def, bb_state = nnx.split(backbone)
    heads_def, heads_state = nnx.split(heads)
    ok, anchors = _scorer(bb_def, heads_def, width)(bb_state, heads_state, jnp.asarray(toks), L, P)
    ok, anchors = np.asarray(ok), np.asarray(anchors)
    n = np.flatnonzero(anchors)  # P-1 .. L-2
    scored = (n[:, None] + np.arange(k)[None] + 1) <= L - 2  # draft j's target y_{n+j+1}: the token at n+j+2
    return ok[n][:, :k] & scored, scored  # chain_correct runs all of the heads' drafts


def agreement(outcomes: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> dict:
    """Per-draft agreement at every position (draft j given drafts 1..j-1 right), and along the anchors of a
    plain k-chain `verify` walking the same texts: the share of its passes that accept draft j (what the
    decoder reports as head acceptance, with every pass feeding k drafts)."""
    hits, count = np.zeros(k), np.zeros(k)
    chain = np.zeros(k)
    anchors = 0
    for ok, scored in outcomes:
        prev = np.ones(len(ok), bool)
        for j in range(k):
            given = prev & scored[:, j]
            hits[j] += np.sum(ok[:, j] & given)
            count[j] += np.sum(given)
            prev = prev & ok[:, j]
        n = 0
        while n < len(ok) and scored[n, 0]:  # a pass anchored at n accepts its leading right drafts, then the
            run = int(np.argmin(np.append(ok[n], False)))  # backbone's bonus token: the next anchor is n + run + 1
            chain[:run] += 1
            anchors += 1
            n += run + 1
    return {"every_position": (hits / np.maximum(count, 1)).round(4).tolist(), "positions": int(count[0]),
            "chain_accepted": (chain / max(anchors, 1)).round(4).tolist(), "chain_anchors": anchors}


def by_set(backbone, heads, sets: Sequence[str], prompts: Sequence[Sequence[int]],
           outputs: Sequence[Sequence[int]], k: int, progress: bool = False) -> dict[str, dict]:
    """`agreement` per prompt set: sets[i] names the set of prompts[i], outputs[i] its `ar` output."""
    outcomes: dict[str, list] = {}
    for name, prompt, output in tqdm(list(zip(sets, prompts, outputs)), desc="drafts at every position",
                                     disable=not progress):
        outcomes.setdefault(name, []).append(chain_outcomes(backbone, heads, prompt, output, k))
    return {name: agreement(outs, k) for name, outs in outcomes.items()}
