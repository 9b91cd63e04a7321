"""One function per decoding mode, each returning the same `Commit` record, and the shared code after it.

`Advance` turns the hidden states of one fed chunk (a `Step`) into committed tokens: the mode's function
decides what to commit (ar, clp, confadapt, gate, verify), the heads draft the next tokens where the
mode needs them, then EOS, the token budget and the cache's capacity cut the commit and it is written.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from clp_jax.decode import sampling
from clp_jax.decode.state import DecodeConfig, DecodeState
from clp_jax.model.numerics import prefix_len
from clp_jax.model.qwen2 import Qwen2

def _take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, W, ...] gathered at idx [B, J] along axis 1 -> [B, J, ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


class Commit(NamedTuple):
    """What one mode decides after a backbone pass, before EOS, budget and capacity cut it."""

    tokens: jax.Array  # [B, k+1] tokens to commit after the row's length
    count: jax.Array  # [B] how many of them (1 .. k+1)
    head_ok: jax.Array  # [B, k] head tokens accepted into `tokens`
    offered: jax.Array  # [B, k] head tokens that were on offer
    head_start: int  # index in `tokens` of head token 0 (1 after t1; 0 for gate and verify)
    anchor: jax.Array | None  # [B] chunk slot of h_n for the next drafts (None: no drafting)
    t1: jax.Array | None  # [B] the backbone's token after the anchor
    t1_logits: jax.Array | None = None  # [B, V] the backbone's next-token logits (ar: for soft labels)


class Step(NamedTuple):
    """One fed chunk: the trunk's states of it and where each row's last committed token sits."""

    hidden: jax.Array  # [B, W, D]
    chunk: jax.Array  # [B, W] the tokens fed
    positions: jax.Array  # [B, W]
    last: jax.Array  # [B] slot of the last committed token (its state is h_n)
    draft_kernel: jax.Array | None = None  # heads.draft_kernel(model), computed once per program


class Advance:
    """Turns the hidden states of one fed chunk into committed tokens and the next drafts.

    One small function per mode returns a `Commit`; the shared code then drafts (heads modes), cuts
    the commit at EOS / budget / capacity and writes it.
    """

    def __init__(self, dc: DecodeConfig, eos_ids: Sequence[int]):
        self.dc = dc
        self.eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
        self.mode_fn = {"ar": self._ar, "clp": self._heads_commit, "confadapt": self._heads_commit,
                        "gate": self._gate, "verify": self._verify}[dc.mode]

    def __call__(self, model: Qwen2, heads, st: DecodeState, step: Step) -> DecodeState:
        dc, sc, k = self.dc, self.dc.sampling, self.dc.k
        B, S = st.buf.shape
        rows = jnp.arange(B)
        rng, key_mode, key_draft = jax.random.split(st.rng, 3)
        active = ~st.done
        j = jnp.arange(k + 1)

        c, drafts = self.mode_fn(model, heads, st, step, key_mode, key_draft)

        # Stop at the first EOS, the token budget, or the cache's capacity.
        in_span = j[None, :] < c.count[:, None]
        is_eos = jnp.isin(c.tokens, self.eos) & in_span
        has_eos = jnp.any(is_eos, axis=-1)
        n_commit = jnp.where(has_eos, jnp.argmax(is_eos, axis=-1) + 1, c.count)
        n_commit = jnp.minimum(n_commit, dc.max_new_tokens - (st.length - st.prompt_len))
        new_length = st.length + n_commit
        finished = has_eos | (new_length - st.prompt_len >= dc.max_new_tokens)
        finished |= new_length + dc.slack > S

        write = jnp.where(active[:, None] & (j[None, :] < n_commit[:, None]), st.length[:, None] + j, S)
        buf = st.buf.at[rows[:, None], write].set(c.tokens, mode="drop")  # S = dropped
        n_next, draft_q = jnp.zeros((B,), jnp.int32), st.draft_q
        if dc.mode == "verify":  # the drafts wait in the buffer, fed with the bonus token next pass
            n_next = jnp.full((B,), k, jnp.int32)
            if dc.verify_drafts == "clp":
                n_next = jnp.minimum(jnp.argmax(drafts.length_logits, -1), k).astype(jnp.int32)
            n_next = jnp.where(finished, 0, n_next)
            if not sc.greedy:
                draft_q = sampling.probs(drafts.logits, sc)  # [B, k, V]
            write = jnp.where(active[:, None] & (j[None, :k] < n_next[:, None]), new_length[:, None] + j[:k], S)
            buf = buf.at[rows[:, None], write].set(drafts.tokens, mode="drop")
            fed = new_length - 1  # the bonus token is fed with the drafts
        else:
            fed = st.length  # everything committed before this step is now cached
        draft_cache = st.draft_cache if drafts is None else drafts.cache
        rec = self._record(st, step, c)

        def keep(new, old):
            mask = active.reshape(active.shape + (1,) * (new.ndim - 1))
            return jnp.where(mask, new, old)

        # a head token counts as accepted only inside the (EOS- and budget-cut) committed span
        in_commit = j[None, :k] + c.head_start < n_commit[:, None]
        return st.replace(
            buf=buf, length=keep(new_length, st.length), fed=keep(fed, st.fed),
            n_draft=keep(n_next, st.n_draft), draft_q=keep(draft_q, st.draft_q),
            done=st.done | finished, rng=rng, passes=st.passes + active,
            offered=st.offered + (c.offered & active[:, None]),
            accepted=st.accepted + (c.head_ok & in_commit & active[:, None]),
            draft_cache=draft_cache, **rec,
        )

    def _record(self, st: DecodeState, step: Step, c: Commit) -> dict:
        """Self-distillation records: the fed slots' hidden states at their positions, and the top-K of
        the next-token distribution at the anchor (the last committed token's position)."""
        out = {}
        B, S = st.buf.shape
        rows = jnp.arange(B)
        if self.dc.record_hidden:
            pos = jnp.where(step.positions < S, step.positions, S)  # [B, W]
            out["rec_hidden"] = st.rec_hidden.at[rows[:, None], pos].set(
                step.hidden.astype(st.rec_hidden.dtype), mode="drop")
        if self.dc.record_topk:
            probs, ids = jax.lax.top_k(jax.nn.softmax(c.t1_logits.astype(jnp.float32), -1), self.dc.record_topk)
            at = step.positions[rows, step.last]  # [B]
            out["rec_topk_ids"] = st.rec_topk_ids.at[rows, at].set(ids.astype(jnp.int32), mode="drop")
            out["rec_topk_probs"] = st.rec_topk_probs.at[rows, at].set(probs, mode="drop")
        return out

    # ------------------------------------------------------------------ drafting

    def _draft(self, model, heads, st: DecodeState, step: Step, anchor, t1, key):
        """The heads' k drafts after `anchor` (whose next token is t1), greedy unless verify samples."""
        sc = self.dc.sampling
        W = step.chunk.shape[1]
        slot = jnp.arange(W)[None, :]
        shifted = jnp.concatenate([step.chunk[:, 1:], step.chunk[:, -1:]], axis=1)  # token after each slot
        next_tokens = jnp.where(slot == anchor[:, None], t1[:, None], shifted)

        def pick(j, logits):
            if self.dc.mode == "verify" and not sc.greedy:
                return sampling.sample(jax.random.fold_in(key, j), sampling.probs(logits, sc))
            return jnp.argmax(logits, -1).astype(jnp.int32)

        return heads.draft(model, step.hidden, next_tokens, step.positions, anchor, self.dc.k,
                           st.draft_cache, pick, step.draft_kernel)

    # ------------------------------------------------------------------ one function per mode

    def _ar(self, model, heads, st, step, key, key_draft):
        """ar: the backbone's next token t1."""
        B, k = step.chunk.shape[0], self.dc.k
        h = _take_rows(step.hidden, step.last[:, None])[:, 0]  # [B, D]
        logits = model.logits(h)
        t1 = sampling.choose(key, logits, self.dc.sampling)
        none = jnp.zeros((B, k), bool)
        return Commit(jnp.pad(t1[:, None], ((0, 0), (0, k))), jnp.ones((B,), jnp.int32), none, none, 1,
                      None, None, logits), None

    def _heads_commit(self, model, heads, st, step, key, key_draft):
        """clp / confadapt: t1 from the backbone plus the accepted prefix of the heads' drafts."""
        dc, sc, k = self.dc, self.dc.sampling, self.dc.k
        h = _take_rows(step.hidden, step.last[:, None])[:, 0]  # [B, D]
        t1_logits = model.logits(h)
        t1 = sampling.choose(key, t1_logits, sc)
        d = self._draft(model, heads, st, step, step.last, t1, key_draft)
        if dc.mode == "clp" and dc.clp_confidence is None:
            n_heads = jnp.minimum(jnp.argmax(d.length_logits, -1), k)
        elif dc.mode == "clp":  # P(L* >= l) is a reversed cumulative sum; it only falls with l
            p = jax.nn.softmax(d.length_logits, axis=-1)  # [B, K+1] over all trained lengths
            at_least = jnp.flip(jnp.cumsum(jnp.flip(p, -1), -1), -1)  # mass beyond k counts for l <= k
            n_heads = jnp.sum(at_least[:, 1:k + 1] >= dc.clp_confidence, axis=-1)
        else:  # confadapt
            conf = jnp.max(jax.nn.softmax(d.logits, axis=-1), axis=-1)  # [B, k]
            n_heads = prefix_len(conf >= dc.tau)
        if not sc.greedy and not heads.drafter.follows_t1:  # these drafts continue the greedy t1 only
            n_heads = jnp.where(t1 == jnp.argmax(t1_logits, -1), n_heads, 0)
        j = jnp.arange(k)
        tokens = jnp.concatenate([t1[:, None], d.tokens], axis=1)  # [B, k+1]
        commit = Commit(tokens, (1 + n_heads).astype(jnp.int32), j[None, :] < n_heads[:, None],
                        jnp.ones_like(d.tokens, bool), 1, step.last, t1)
        return commit, d

    def _gate(self, model, heads, st, step, key, key_draft):
        """gate (prior design): heads for n+1 .. n+k, head 1 replacing t1 when the gate accepts it."""
        dc, k = self.dc, self.dc.k
        h = _take_rows(step.hidden, step.last[:, None])[:, 0]  # [B, D]
        prop = heads.propose_gate(model, h, k)
        t1 = sampling.choose(key, prop.t1_logits, dc.sampling)
        drafts = jnp.argmax(prop.draft_logits, -1).astype(jnp.int32)  # [B, k] for n+1 .. n+k
        m = prefix_len(jax.nn.sigmoid(prop.length_logits) >= dc.gate_threshold)
        tokens = jnp.where((m > 0)[:, None], jnp.pad(drafts, ((0, 0), (0, 1))),
                           jnp.pad(t1[:, None], ((0, 0), (0, k))))
        ok = jnp.arange(k)[None, :] < m[:, None]
        return Commit(tokens, jnp.maximum(m, 1), ok, jnp.ones_like(ok), 0, None, None), None

    def _verify(self, model, heads, st, step, key, key_draft):
        """verify (lossless): the longest prefix of the fed drafts the backbone confirms, plus its own
        next token; then new drafts after it. Scores J = min(k+1, W) rows: a narrow chunk (adaptive
        width) carries fewer drafts."""
        sc, k = self.dc.sampling, self.dc.k
        hidden, chunk, i0 = step.hidden, step.chunk, step.last
        B, W = chunk.shape
        J = min(k + 1, W)
        rows = jnp.arange(B)
        j = jnp.arange(J)
        idx = jnp.clip(i0[:, None] + j, 0, W - 1)  # [B, J]
        logits = model.logits(_take_rows(hidden, idx))  # [B, J, V]
        drafts = _take_rows(chunk, jnp.clip(idx[:, :J - 1] + 1, 0, W - 1))  # [B, J-1] d_j sits at i0 + j
        valid = j[None, :J - 1] < st.n_draft[:, None]
        if sc.greedy:
            target = jnp.argmax(logits, -1).astype(jnp.int32)  # [B, J]
            n_acc = prefix_len((drafts == target[:, :J - 1]) & valid)
            bonus = target[rows, n_acc]
        else:
            key_u, key_x = jax.random.split(key)
            p = sampling.probs(logits, sc)  # [B, J, V]
            q = st.draft_q[:, :J - 1]
            p_d = jnp.take_along_axis(p[:, :J - 1], drafts[..., None], -1)[..., 0]  # [B, J-1]
            q_d = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
            u = jax.random.uniform(key_u, (B, J - 1))
            n_acc = prefix_len((u * q_d < p_d) & valid)  # accept with probability min(1, p/q)
            p_a = p[rows, n_acc]  # [B, V]
            q_a = st.draft_q[rows, jnp.minimum(n_acc, k - 1)]
            residual = jnp.maximum(p_a - q_a, 0.0)
            rejected = (n_acc < st.n_draft) & (jnp.sum(residual, -1) > 0)
            dist = jnp.where(rejected[:, None], residual / jnp.sum(residual, -1, keepdims=True), p_a)
            bonus = sampling.sample(key_x, dist)
        padded = jnp.pad(drafts, ((0, 0), (0, k + 2 - J)))  # [B, k+1]
        tokens = jnp.where(jnp.arange(k + 1)[None, :] < n_acc[:, None], padded, bonus[:, None])
        anchor = i0 + n_acc  # slot of the last accepted token: its state is h_n for the next drafts
        d = self._draft(model, heads, st, step, anchor, bonus, key_draft)
        jk = jnp.arange(k)[None, :]
        commit = Commit(tokens, n_acc + 1, jk < n_acc[:, None], jk < st.n_draft[:, None], 0, anchor, bonus)
        return commit, d


