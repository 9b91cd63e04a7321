"""Room: the tail every mode shares after a backbone pass; writes the DecodeState but its KV cache and step.

`AfterPass` cuts the commit, writes it and keeps the statistics: it asks the mode (decode/modes.py) what to
commit and draft, then stops each row at its first EOS, its token budget or the cache's capacity, writes the
committed tokens and the pending drafts into the buffer, and counts the pass: its width, the drafts it fed,
the drafting it ran and its cost in one-slot passes (from the pass-cost table), per row.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from clp_jax.decode.pass_costs import PassCosts
from clp_jax.decode.protocol import Ctx, Mode, Step
from clp_jax.decode.state import DecodeState
from clp_jax.model.qwen2 import Qwen2


def init_stats(B: int, W: int, k: int) -> dict:
    """The pass statistics of DecodeState.stats (loop passes only; the prefill is not counted)."""
    return {"width": jnp.zeros((B, W), jnp.int32), "fed": jnp.zeros((B, k + 1), jnp.int32),
            "draft_steps": jnp.zeros((B,), jnp.int32), "cost": jnp.zeros((B,), jnp.float32),
            "source": jnp.zeros((B, 2), jnp.int32), "tree": jnp.zeros((B, 2), jnp.int32)}


class AfterPass:
    """Turns the hidden states of one fed chunk into committed tokens, pending drafts and statistics."""

    def __init__(self, mode: Mode, costs: PassCosts, eos_ids: Sequence[int], slack: int):
        self.mode, self.dc, self.costs, self.slack = mode, mode.dc, costs, slack
        self.eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)

    def __call__(self, model: Qwen2, heads, st: DecodeState, step: Step) -> DecodeState:
        dc, k = self.dc, self.dc.k
        B, S = st.buf.shape
        rows = jnp.arange(B)
        rng, key = jax.random.split(st.rng)
        active = ~st.done
        j = jnp.arange(k + 1)

        c, nxt, mode_state = self.mode.step(Ctx(model, heads, st, step, key))

        # Stop at the first EOS, the token budget, or the cache's capacity.
        in_span = j[None, :] < c.count[:, None]
        is_eos = jnp.isin(c.tokens, self.eos) & in_span
        has_eos = jnp.any(is_eos, axis=-1)
        n_commit = jnp.where(has_eos, jnp.argmax(is_eos, axis=-1) + 1, c.count)
        n_commit = jnp.minimum(n_commit, dc.max_new_tokens - (st.length - st.prompt_len))
        new_length = st.length + n_commit
        finished = has_eos | (new_length - st.prompt_len >= dc.max_new_tokens)
        finished |= new_length + self.slack > S

        write = jnp.where(active[:, None] & (j[None, :] < n_commit[:, None]), st.length[:, None] + j, S)
        buf = st.buf.at[rows[:, None], write].set(c.tokens, mode="drop")  # S = dropped
        # pending drafts wait in the buffer after the commit, fed with the next chunk
        n_next = jnp.where(finished, 0, nxt.count).astype(jnp.int32)
        write = jnp.where(active[:, None] & (j[None, :k] < n_next[:, None]), new_length[:, None] + j[:k], S)
        buf = buf.at[rows[:, None], write].set(nxt.tokens, mode="drop")
        n_tree = jnp.zeros_like(n_next)
        if nxt.tree_tokens is not None:  # siblings after the drafts
            n_tree = jnp.where(finished, 0, nxt.tree_count).astype(jnp.int32)
            T = nxt.tree_tokens.shape[1]
            jt = jnp.arange(T)[None, :]
            write = jnp.where(active[:, None] & (jt < n_tree[:, None]), (new_length + n_next)[:, None] + jt, S)
            buf = buf.at[rows[:, None], write].set(nxt.tree_tokens, mode="drop")
        fed = st.length + c.cached  # committed tokens this pass fed are cached; the rest is fed next
        rec = self.mode.record(st, step, c)

        def keep(new, old):
            mask = active.reshape(active.shape + (1,) * (new.ndim - 1))
            return jnp.where(mask, new, old)

        # a head token counts as accepted only inside the (EOS- and budget-cut) committed span
        in_commit = j[None, :k] + c.head_start < n_commit[:, None]
        return st.replace(
            buf=buf, length=keep(new_length, st.length), fed=keep(fed, st.fed), n_draft=keep(n_next, st.n_draft),
            n_tree=keep(n_tree, st.n_tree),
            done=st.done | finished, rng=rng, passes=st.passes + active,
            offered=st.offered + (c.offered & active[:, None]),
            accepted=st.accepted + (c.head_ok & in_commit & active[:, None]),
            mode_state=jax.tree.map(keep, mode_state, st.mode_state),
            stats=st.stats if step.prefill else self._count(st, step, nxt, active, c), **rec,
        )

    def _count(self, st: DecodeState, step: Step, nxt, active, c) -> dict:
        """One loop pass of every active row: its width (the batch's), the drafts it fed, drafting, cost, and
        the draft tree's siblings fed and accepted."""
        s, on = st.stats, active.astype(jnp.int32)
        W = step.chunk.shape[1]
        rows = jnp.arange(on.shape[0])
        fed = jnp.minimum(st.n_draft, self.dc.k)
        source = jnp.broadcast_to(jnp.asarray(nxt.source, jnp.int32), on.shape)
        return {"width": s["width"].at[:, min(W, s["width"].shape[1]) - 1].add(on),
                "fed": s["fed"].at[rows, fed].add(on),
                "draft_steps": s["draft_steps"] + on * jnp.asarray(nxt.steps, jnp.int32),
                "cost": s["cost"] + jnp.where(active, self.costs.pass_cost(W) + jnp.asarray(nxt.cost, jnp.float32),
                                              0.0),
                "source": s["source"].at[rows, source].add(on * (jnp.asarray(nxt.count) > 0)),
                "tree": s["tree"] + on[:, None] * jnp.stack(
                    [st.n_tree, jnp.broadcast_to(jnp.asarray(c.tree_ok, jnp.int32), on.shape)], 1)}
