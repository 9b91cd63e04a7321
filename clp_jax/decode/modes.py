"""Room: the modes ar, clp, confadapt, gate and the registry `make_mode`; a step only returns, never writes.

One object per decoding mode: what it drafts, how wide it feeds, what it commits, and its own state.
Every mode answers `step(ctx) -> (Commit, Next, mode_state)` after a backbone pass over one fed chunk (the
protocol: decode/protocol.py); `AfterPass` (decode/after_pass.py) then cuts the commit at EOS, the token
budget and the cache's capacity and writes it. `make_mode(dc, costs)` is the one registry (the decoder,
prefill and loop alike, ask the object whether it drafts). `verify` lives in decode/verify.py.

  * ar        commit t1 = argmax LM(h_n)                  (or a sample)
  * clp       commit t1 and the first L head tokens, L = argmax CLP(h_n)
  * confadapt commit t1 and the longest prefix of head tokens whose top-1 probability >= tau
  * gate      prior design: heads predict n+1..n+k, an MLP gate accepts a prefix; head 1 replaces t1
  * verify    lossless: drafts fed with the next pass are checked by the backbone (decode/verify.py)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clp_jax.decode import sampling
from clp_jax.decode.protocol import Commit, Mode, Step, anchor_logits, nothing, take_rows
from clp_jax.decode.state import DecodeConfig, DecodeState
from clp_jax.decode.verify import Verify
from clp_jax.drafting.heads import clp_length
from clp_jax.model.numerics import prefix_len, top_k_probs


class Ar(Mode):
    """ar: the backbone's next token t1, one per pass; optionally records what self-distillation needs."""

    name = "ar"
    drafts = False

    @property
    def width(self) -> int:
        return 1

    def step(self, ctx):
        B = ctx.step.chunk.shape[0]
        _, logits = anchor_logits(ctx)
        t1 = sampling.choose(ctx.key, logits, self.dc.sampling)
        none = jnp.zeros((B, self.k), bool)
        commit = Commit(tokens=jnp.pad(t1[:, None], ((0, 0), (0, self.k))), count=jnp.ones((B,), jnp.int32),
                        head_ok=none, offered=none, t1_logits=logits)
        return commit, nothing(B, self.k), ctx.st.mode_state

    def record(self, st: DecodeState, step: Step, c: Commit) -> dict:
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
            probs, ids = top_k_probs(c.t1_logits, self.dc.record_topk)
            at = step.positions[rows, step.last]  # [B]
            out["rec_topk_ids"] = st.rec_topk_ids.at[rows, at].set(ids.astype(jnp.int32), mode="drop")
            out["rec_topk_probs"] = st.rec_topk_probs.at[rows, at].set(probs, mode="drop")
        return out


def greedy_pick(j: int, logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, -1).astype(jnp.int32)


class _HeadsCommit(Mode):
    """t1 from the backbone plus a prefix of the heads' drafts, accepted unverified (how long: `n_heads`)."""

    def init_state(self, B, S, model, heads):
        return heads.init_cache(B, S, model.cfg.jnp_dtype)  # the drafter's own cache (the draft layer's KV)

    def n_heads(self, drafts, t1_logits) -> jax.Array:
        raise NotImplementedError

    def step(self, ctx):
        sc, k, step = self.dc.sampling, self.k, ctx.step
        _, t1_logits = anchor_logits(ctx)
        t1 = sampling.choose(ctx.key, t1_logits, sc)
        d = ctx.heads.draft(ctx.model, step.hidden, step.next_tokens(step.last, t1), step.positions, step.last, k,
                            ctx.st.mode_state, greedy_pick, step.draft_kernel)
        n = self.n_heads(d, t1_logits)
        if not sc.greedy and not ctx.heads.drafter.follows_t1:  # these drafts continue the greedy t1 only
            n = jnp.where(t1 == jnp.argmax(t1_logits, -1), n, 0)
        commit = Commit(tokens=jnp.concatenate([t1[:, None], d.tokens], axis=1), count=(1 + n).astype(jnp.int32),
                        head_ok=jnp.arange(k)[None, :] < n[:, None], offered=jnp.ones_like(d.tokens, bool))
        W = step.chunk.shape[1]
        spent = 0.0 if self.costs is None or step.prefill else self.costs.draft_cost(W, k)
        return commit, nothing(t1.shape[0], k, k, spent), d.cache


class Clp(_HeadsCommit):
    """clp: the CLP's argmax L, or with a margin p the most heads l with P(L* >= l) >= p."""

    name = "clp"

    def n_heads(self, d, t1_logits):
        return clp_length(d.length_logits, self.k, self.dc.clp_confidence)  # [B]


class ConfAdapt(_HeadsCommit):
    """confadapt: the longest prefix of drafts whose top-1 probability >= tau."""

    name = "confadapt"

    def n_heads(self, d, t1_logits):
        conf = jnp.max(jax.nn.softmax(d.logits, axis=-1), axis=-1)  # [B, k]
        return prefix_len(conf >= self.dc.tau)


class Gate(Mode):
    """gate (prior design): heads for n+1 .. n+k, head 1 replacing t1 when the gate accepts it."""

    name = "gate"
    drafts = False  # its own gate heads, not the drafter

    def step(self, ctx):
        k = self.k
        h = take_rows(ctx.step.hidden, ctx.step.last[:, None])[:, 0]  # [B, D]
        prop = ctx.heads.propose_gate(ctx.model, h, k)
        t1 = sampling.choose(ctx.key, prop.t1_logits, self.dc.sampling)
        drafts = jnp.argmax(prop.draft_logits, -1).astype(jnp.int32)  # [B, k] for n+1 .. n+k
        m = prefix_len(jax.nn.sigmoid(prop.length_logits) >= self.dc.gate_threshold)
        tokens = jnp.where((m > 0)[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), jnp.pad(t1[:, None], ((0, 0), (0, k))))
        ok = jnp.arange(k)[None, :] < m[:, None]
        commit = Commit(tokens=tokens, count=jnp.maximum(m, 1), head_ok=ok, offered=jnp.ones_like(ok), head_start=0)
        return commit, nothing(t1.shape[0], k), ctx.st.mode_state


def make_mode(dc: DecodeConfig, costs=None) -> Mode:
    """The mode object for a config (`costs`: the pass-cost table verify's budget reads)."""
    return {"ar": Ar, "clp": Clp, "confadapt": ConfAdapt, "gate": Gate, "verify": Verify}[dc.mode](dc, costs)
