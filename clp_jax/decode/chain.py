"""Room: the drafter's chain under a stopping rule; calls the drafter, returns its cache, writes nothing.

The drafter's chain, step by step, so that a budget can stop it early inside a jitted loop.

The draft layer drafts autoregressively: step 1 runs over the fed chunk (writing its cache for the
committed positions) and each further step over the draft just made. `run_chain` runs that chain
(`DraftLayer.chain`) with the budget as its stopping rule: a further step runs under `lax.cond` only while
some row still wants one (on XLA:CPU a skipped step costs nothing; computing all k and feeding m costs
every step). Drafters that draft all positions at once (Medusa heads, test doubles) are called once
through `Heads.draft`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from clp_jax.decode.budget import confidence
from clp_jax.drafting.draft_layer import DraftLayer


class Chain(NamedTuple):
    tokens: jax.Array  # [B, k] drafts (0 past a row's steps)
    logits: jax.Array  # [B, k, V] their logits (0 past a row's steps)
    conf: jax.Array  # [B, k] calibrated top-1 probabilities (0 past a row's steps)
    fed: jax.Array  # [B, k] bool: the budget's sequential "feed draft j" (a prefix)
    steps: jax.Array  # [B] int32 steps computed (each row's own; the batch runs the widest)
    cost: jax.Array  # [B] float32 drafting cost spent, in one-slot passes
    clp_count: jax.Array  # [B] the CLP's predicted number of accepted drafts at h_n (its argmax)
    cache: tuple  # the drafter's cache
    second: jax.Array | None = None  # [B, k] the runner-up at each depth (the draft tree's siblings)
    second_conf: jax.Array | None = None  # [B, k] its calibrated probability


# after_step(c [B, j], D [B], fed_before [B]) -> (feed draft j [B], draft one more [B])
AfterStep = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
# sample(j, logits [B, V]) -> tokens [B]; None: greedy
Sample = Callable[[int, jax.Array], jax.Array] | None


def has_chain(heads) -> bool:
    """Whether the drafter drafts step by step (the draft layer)."""
    return isinstance(getattr(heads, "drafter", None), DraftLayer)


def runner_up(logits: jax.Array, token: jax.Array, T) -> tuple[jax.Array, jax.Array]:
    """The most likely id of logits [..., V] other than `token` [...], and its calibrated probability."""
    masked = jnp.where(jax.nn.one_hot(token, logits.shape[-1], dtype=bool), -jnp.inf, logits.astype(jnp.float32))
    second = jnp.argmax(masked, -1).astype(jnp.int32)
    t = jnp.asarray(T, jnp.float32)
    p = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32) / t[..., None], -1), second[..., None], -1)
    return second, jnp.exp(p[..., 0])


def draft_scores(heads, model, f: jax.Array, kernel, sample: Sample, j: int, T: jax.Array):
    """One draft from features f [B, 1, D]: (logits over the full vocabulary [B, V] when sampling, else an
    empty [B, 0]; token [B]; calibrated confidence [B]; the runner-up [B] and its calibrated probability [B]).
    Greedy drafts with a draft vocabulary score its U ids alone (no scatter into V)."""
    if sample is None and getattr(heads, "draft_vocab", None) is not None and kernel is not None:
        sub = model.logits(f, kernel=kernel)[:, 0]  # [B, U]
        best = jnp.argmax(sub, -1)
        vocab = heads.draft_vocab[...]
        second, c2 = runner_up(sub, best, T)
        return (jnp.zeros(sub.shape[:1] + (0,)), vocab[best].astype(jnp.int32), confidence(sub, T),
                vocab[second].astype(jnp.int32), c2)
    logits = heads.draft_logits(model, f, kernel)[:, 0]  # [B, V]
    token = jnp.argmax(logits, -1).astype(jnp.int32) if sample is None else sample(j, logits)
    second, c2 = runner_up(logits, token, T)
    return ((logits if sample is not None else jnp.zeros(logits.shape[:1] + (0,))), token, confidence(logits, T),
            second, c2)


def run_chain(heads, model, hidden, next_tokens, positions, anchor, k: int, cache, kernel, sample: Sample,
              temperatures: jax.Array, after_step: AfterStep, first_cost: float, step_cost: float,
              want: jax.Array) -> Chain:
    """Drafts after each row's anchor slot of a fed chunk.

    Args:
      hidden: [B, W, D] the trunk's states of the chunk; next_tokens [B, W]; positions [B, W].
      anchor: [B] the slot whose state is h_n.
      sample: draws draft j's token from its logits (None: greedy).
      temperatures: [k] confidence temperatures.
      first_cost / step_cost: the table's cost of the first step over this chunk and of each further step.
      want: [B] rows that draft at all (the others' results are computed, unused, and cost them nothing).
    """
    B = hidden.shape[0]
    chained = has_chain(heads)
    cost = jnp.where(want, first_cost, 0.0)
    conf, fed, go, steps = [], [], want, jnp.zeros((B,), jnp.int32)

    def account(j, c):
        """Books draft j (1-based; calibrated confidence c [B]) for the rows that computed it; returns the rows
        that draft one more. A chained drafter pays a step per further draft, Medusa heads drafted at once."""
        nonlocal cost, go, steps
        if j > 1 and chained:
            cost = cost + jnp.where(go, step_cost, 0.0)
        steps = steps + go
        conf.append(jnp.where(go, c, 0.0))
        feed, go_next = after_step(jnp.stack(conf, 1), cost, (fed[-1] & go) if fed else want)
        fed.append(feed)
        go = go & go_next
        return go

    if not chained:
        pick = sample or (lambda j, logits: jnp.argmax(logits, -1).astype(jnp.int32))
        d = heads.draft(model, hidden, next_tokens, positions, anchor, k, cache, pick, kernel)
        c = confidence(d.logits, temperatures[None, :])  # [B, k]
        for j in range(k):
            account(j + 1, c[:, j])
        tokens, logits, length_logits, cache = d.tokens, d.logits, d.length_logits, d.cache
        second, second_conf = runner_up(d.logits, d.tokens, temperatures[None, :])
    else:
        def score(j, f):
            logits, token, c, second, c2 = draft_scores(heads, model, f, kernel, sample, j, temperatures[j])
            return token, logits, c, second, c2

        outs, cache = heads.drafter.chain(model, hidden, next_tokens, positions, anchor, k, cache, score,
                                          lambda j, outs: account(j, outs[-1][2]))
        account(k, outs[-1][2])
        tokens, logits = jnp.stack([o[0] for o in outs], 1), jnp.stack([o[1] for o in outs], 1)
        second, second_conf = jnp.stack([o[3] for o in outs], 1), jnp.stack([o[4] for o in outs], 1)
        length_logits = heads.clp(hidden[jnp.arange(B), anchor])
    live = jnp.arange(k)[None, :] < steps[:, None]
    return Chain(jnp.where(live, tokens, 0), logits, jnp.stack(conf, 1), jnp.stack(fed, 1), steps, cost,
                 jnp.argmax(length_logits, -1).astype(jnp.int32), cache, jnp.where(live, second, 0),
                 jnp.where(live, second_conf, 0.0))
