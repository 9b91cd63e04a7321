"""Room: `verify` (lossless speculative decoding), all of it; writes only its VerifyState and its Commit/Next.

Each pass feeds a row's bonus token (the backbone's own last token) followed by the drafts pending for it.
The backbone's token at every fed slot checks them: the longest matching prefix is committed plus the
backbone's next token (speculative sampling when temperature > 0, so the output distribution equals
`ar`'s). Then the drafter drafts after the last committed token, and the budget (decode/budget.py) picks
how many of the drafts the next pass feeds; the decoder runs that pass at the widest row's need.

A row that stops drafting leaves its committed positions out of the draft layer's cache; their trunk states
wait in a small buffer (`gap_*`, PROBE_EVERY slots: one probe period of the budget) and the next drafting
step runs over them first (the catch-up), so a row decoding at `ar` cost pays one draft step every
PROBE_EVERY tokens instead of one per token.

With a draft tree (`DecodeConfig.tree`, decode/tree.py), the pass also feeds siblings: the drafter's
runner-up at depths 1..n beside the chain, each a leaf. Where the chain's draft at depth a+1 is rejected,
the sibling of that depth is tested next (greedy: is it the backbone's token; sampling: accepted with its
probability under the distribution the rejected draft leaves, and the bonus token drawn from that
distribution without it, so the law stays `ar`'s), and an accepted sibling is committed with the backbone's
token after it: one more token from the same pass. The budget adds siblings while their expected tokens pay
for the wider pass.

Drafts can also come from the context (`draft_source`, decode/lookup.py): "lookup" feeds only the
continuation of the text's latest earlier n-gram; "both" takes it where the match is at least
BOTH_MIN_NGRAM tokens long (no drafter step that pass) and the drafter's chain elsewhere. Retrieved drafts
are verified the same way (a point-mass draft distribution when sampling); their confidence is a prior
corrected online per row like the drafter's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from clp_jax.decode import sampling, tree
from clp_jax.decode.budget import DEFAULT_TEMPERATURE, PROBE_EVERY, Budget, Stats
from clp_jax.decode.chain import Chain, has_chain, run_chain
from clp_jax.decode.lookup import propose
from clp_jax.decode.pass_costs import FLAT
from clp_jax.decode.protocol import Commit, Ctx, Mode, Next, take_rows
from clp_jax.model.numerics import prefix_len
from clp_jax.model.qwen2 import PAD_SENTINEL

LOOKUP_CONF = 0.5  # prior chance that a retrieved draft is accepted (given the earlier ones were)
# draft_source "both": retrieved drafts where the matched suffix is at least this long, else the drafter's.
# Measured (HumanEval 100-107 + 4 chat prompts outside the bench, 128 tokens, shipped draft layer, k=3, cost
# per token in one-slot passes): heads only 0.93 / 1.01 (code / chat), lookup only 0.86 / 0.77, both with a
# 2-gram 0.79 / 0.78, 3-gram 0.83 / 0.83, 4-gram 0.82 / 0.84.
BOTH_MIN_NGRAM = 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifyState:
    draft_cache: tuple  # the drafter's own cache (the draft layer's KV; empty for Medusa heads)
    draft_q: jax.Array  # [B, k, V] distributions the pending drafts were drawn from (sampling; else V = 0)
    conf: jax.Array  # [B, k] calibrated confidences of the drafts computed last step (0 past its chain)
    cost: jax.Array  # [B] drafting cost spent on them
    drafted: jax.Array  # [B] bool: the row drafted last step
    first: jax.Array  # [B] the chain's first draft (checked for free when it was not fed)
    first_unfed: jax.Array  # [B] bool: a first draft was computed but not fed
    budget: Stats  # what the draft budget learnt about the row's drafter
    lookup: Stats  # ... and about its retrieved drafts
    source: jax.Array  # [B] where the pending drafts come from: 0 the drafter, 1 the context
    gap_hidden: jax.Array  # [B, G, D] trunk states of committed positions the draft cache lacks
    gap_next: jax.Array  # [B, G] the committed token after each
    gap_pos: jax.Array  # [B, G] their positions (PAD_SENTINEL: empty)
    gap_n: jax.Array  # [B] committed tokens since the row last drafted

    def replace(self, **kw) -> "VerifyState":
        return dataclasses.replace(self, **kw)


class Verify(Mode):
    name = "verify"
    drafts = True

    def __init__(self, dc, costs=None):
        super().__init__(dc, costs)
        self.costs = costs or FLAT
        self.heads_draft = dc.draft_source != "lookup"
        self.greedy = dc.sampling.greedy
        self.tree = dc.tree
        W = self.width
        # a pass's cost by slots fed: flat when every pass runs at the full width
        self.slot_costs = [self.costs.pass_cost(w if dc.adaptive else W) for w in range(1, W + 1)]
        widths = self.slot_costs[:self.k + 1]
        self.budget = Budget(widths, self.costs.draft_step, self.k, self.greedy) if dc.draft_budget == "auto" else None

    @property
    def width(self) -> int:
        """The bonus, k drafts and the siblings, plus, with a tree, an accepted sibling fed again."""
        return self.k + 1 + self.dc.tree + (1 if self.dc.tree else 0)

    def gap_size(self, heads) -> int:
        """Slots of the catch-up buffer, one probe period: the PROBE_EVERY committed tokens a row may leave
        out of the draft layer's cache before it catches up. Only a drafter with a cache of its own, under
        the budget, has one."""
        return PROBE_EVERY if self.budget is not None and self.heads_draft and has_chain(heads) else 0

    def init_state(self, B, S, model, heads):
        k, G, D = self.k, self.gap_size(heads), model.cfg.hidden_size
        V = 0 if self.greedy else model.cfg.vocab_size
        return VerifyState(
            draft_cache=heads.init_cache(B, S, model.cfg.jnp_dtype), draft_q=jnp.zeros((B, k, V), jnp.float32),
            conf=jnp.zeros((B, k), jnp.float32), cost=jnp.zeros((B,), jnp.float32),
            drafted=jnp.zeros((B,), bool), first=jnp.zeros((B,), jnp.int32), first_unfed=jnp.zeros((B,), bool),
            budget=Stats.init(B, k), lookup=Stats.init(B, k), source=jnp.zeros((B,), jnp.int32),
            gap_hidden=jnp.zeros((B, G, D), model.cfg.jnp_dtype), gap_next=jnp.zeros((B, G), jnp.int32),
            gap_pos=jnp.full((B, G), PAD_SENTINEL, jnp.int32),
            gap_n=jnp.zeros((B,), jnp.int32))

    # ------------------------------------------------------------------ one step

    def step(self, ctx: Ctx):
        st, step, k = ctx.st, ctx.step, self.k
        vs: VerifyState = st.mode_state
        key_check, key_draft = jax.random.split(ctx.key)
        n_acc, bonus, first_ok, sib_ok = self._check(ctx, key_check)
        rows = jnp.arange(step.chunk.shape[0])
        if self.tree:  # the accepted path made contiguous: an accepted sibling takes its chain slot
            hidden, chunk, positions = tree.path_step(step.hidden, step.chunk, step.positions, step.last, n_acc,
                                                      st.n_draft, sib_ok, PAD_SENTINEL)
            step = step._replace(hidden=hidden, chunk=chunk, positions=positions)
            ctx = ctx._replace(step=step)
        n_in = n_acc + sib_ok.astype(jnp.int32)  # drafts committed (a sibling last)
        active = ~st.done
        stats, lstats = vs.budget, vs.lookup
        if self.budget is not None:
            heads = active & (vs.source == 0)
            stats = self.budget.observe(stats, vs.conf, st.n_draft, n_acc, (vs.first_unfed, first_ok), vs.drafted,
                                        vs.cost, heads)
            none = jnp.zeros_like(vs.first_unfed)
            lstats = self.budget.observe(lstats, vs.conf, st.n_draft, n_acc, (none, first_ok), none, vs.cost,
                                         active & (vs.source == 1))
            if not step.prefill:  # the row's rate, over the passes of both draft sources
                P = jnp.asarray(self.slot_costs, jnp.float32)
                spent = P[jnp.clip(st.n_draft + st.n_tree, 0, P.shape[0] - 1)] + vs.cost
                stats = self.budget.account(stats, n_in + 1, spent, active)
        L = stats.rate()  # [B] the row's tokens per one-slot pass so far (read by the budget only)
        anchor = step.last + n_in  # slot of the last accepted token: its state is h_n for the next drafts
        # the committed text after this step: the accepted drafts are in the buffer already, then the bonus
        lk, use_lookup = None, jnp.zeros_like(active)
        if self.dc.draft_source != "heads":
            text = st.buf
            if self.tree:  # an accepted sibling is not in the buffer where the chain's draft of its depth is
                sib = step.chunk[rows, jnp.clip(step.last + n_in, 0, step.chunk.shape[1] - 1)]
                text = text.at[rows, jnp.where(sib_ok, st.length + n_acc, text.shape[1])].set(sib, mode="drop")
            lk = propose(text.at[rows, st.length + n_in].set(bonus), st.length + n_in + 1, k)
            use_lookup = (lk.count > 0) & (lk.ngram >= (BOTH_MIN_NGRAM if self.heads_draft else 1))
        drafted, gaps = self._draft(ctx, vs, stats, L, anchor, bonus, key_draft, use_lookup)
        ch = self._merge_lookup_drafts(drafted, lk, use_lookup, lstats, L)
        m = self._how_many(ch, stats, active, use_lookup, lstats, L)
        n_sib = self._how_many_siblings(ch, m, stats, use_lookup, L)

        padded = jnp.pad(take_rows(step.chunk, jnp.clip(step.last[:, None] + 1 + jnp.arange(k), 0,
                                                        step.chunk.shape[1] - 1)), ((0, 0), (0, 1)))  # [B, k+1]
        jk = jnp.arange(k)[None, :]
        # an accepted sibling's keys and values were not cached (its position was the chain's): fed again next
        commit = Commit(tokens=jnp.where(jnp.arange(k + 1)[None, :] < n_in[:, None], padded, bonus[:, None]),
                        count=n_in + 1, head_ok=jk < n_acc[:, None], offered=jk < st.n_draft[:, None], head_start=0,
                        cached=n_acc, tree_ok=sib_ok.astype(jnp.int32))
        heads_rows = (ch.steps > 0) & ~use_lookup
        q = vs.draft_q
        if not self.greedy:
            q = jnp.where(use_lookup[:, None, None], jax.nn.one_hot(ch.tokens, q.shape[-1]),
                          sampling.probs(ch.logits, self.dc.sampling))
        new = vs.replace(
            draft_cache=ch.cache, conf=ch.conf, cost=ch.cost, drafted=heads_rows, first=ch.tokens[:, 0],
            first_unfed=heads_rows & (m == 0), budget=stats, lookup=lstats, source=use_lookup.astype(jnp.int32),
            draft_q=q, **gaps)
        spent = jnp.zeros_like(drafted.cost) if step.prefill else drafted.cost  # catch-ups of lookup rows too
        siblings = ch.second[:, :self.tree] if self.tree else None
        return commit, Next(ch.tokens, m, drafted.steps, spent, use_lookup.astype(jnp.int32), siblings, n_sib), new

    def _check(self, ctx: Ctx, key):
        """The pending drafts against the backbone: accepted count [B] (the chain's), the bonus token [B],
        whether an unfed first draft was right (greedy: 0/1; sampled: its acceptance probability) [B], and
        whether the sibling at the depth after the accepted chain was accepted [B] (the bonus then follows it)."""
        st, step, sc, k = ctx.st, ctx.step, self.dc.sampling, self.k
        vs: VerifyState = st.mode_state
        hidden, chunk, i0 = step.hidden, step.chunk, step.last
        B, W = chunk.shape
        J = min(k + 1, W)  # a narrow chunk (adaptive width) carries fewer drafts
        rows, j = jnp.arange(B), jnp.arange(J)
        idx = jnp.clip(i0[:, None] + j, 0, W - 1)  # [B, J]
        logits = ctx.model.logits(take_rows(hidden, idx))  # [B, J, V]
        drafts = take_rows(chunk, jnp.clip(idx[:, :J - 1] + 1, 0, W - 1))  # [B, J-1] d_j sits at i0 + j
        valid = j[None, :J - 1] < st.n_draft[:, None]
        no_sib = jnp.zeros((B,), bool)

        def sibling(n_acc):  # the sibling of the depth after the accepted chain, and whether one was fed
            slot = jnp.clip(i0 + st.n_draft + 1 + n_acc, 0, W - 1)
            return slot, chunk[rows, slot], (n_acc < st.n_draft) & (n_acc < st.n_tree)

        def sib_logits(slot, any_ok):
            V = ctx.model.cfg.vocab_size
            return jax.lax.cond(any_ok, lambda h: ctx.model.logits(h), lambda h: jnp.zeros((B, V), logits.dtype),
                                hidden[rows, slot])
        if sc.greedy:
            target = jnp.argmax(logits, -1).astype(jnp.int32)  # [B, J]
            n_acc = prefix_len((drafts == target[:, :J - 1]) & valid)
            bonus, ok = target[rows, n_acc], no_sib
            if self.tree:
                slot, tok, has = sibling(n_acc)
                ok = has & (tok == bonus)
                after = jnp.argmax(sib_logits(slot, jnp.any(ok)), -1).astype(jnp.int32)
                bonus = jnp.where(ok, after, bonus)
            return n_acc, bonus, (vs.first == target[:, 0]).astype(jnp.float32), ok
        key_u, key_x = jax.random.split(key)
        if self.tree:
            key_u, key_s = jax.random.split(key_u)
        p = sampling.probs(logits, sc)  # [B, J, V]
        q = vs.draft_q[:, :J - 1]
        p_d = jnp.take_along_axis(p[:, :J - 1], drafts[..., None], -1)[..., 0]  # [B, J-1]
        q_d = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
        u = jax.random.uniform(key_u, (B, J - 1))
        n_acc = prefix_len((u * q_d < p_d) & valid)  # accept with probability min(1, p/q)
        p_a = p[rows, n_acc]  # [B, V]
        q_a = vs.draft_q[rows, jnp.minimum(n_acc, k - 1)]
        residual = jnp.maximum(p_a - q_a, 0.0)
        rejected = (n_acc < st.n_draft) & (jnp.sum(residual, -1) > 0)
        dist = jnp.where(rejected[:, None], residual / jnp.sum(residual, -1, keepdims=True), p_a)
        ok = no_sib
        if self.tree:  # the sibling, a point-mass draft against what the rejection leaves: kept with dist[s]
            slot, tok, has = sibling(n_acc)
            r_s = dist[rows, tok]
            ok = has & (jax.random.uniform(key_s, (B,)) < r_s)
            rest = dist.at[rows, tok].set(0.0)
            rest = rest / jnp.maximum(jnp.sum(rest, -1, keepdims=True), 1e-30)
            p_sib = sampling.probs(sib_logits(slot, jnp.any(ok)), sc)
            dist = jnp.where(ok[:, None], p_sib, jnp.where(has[:, None], rest, dist))
        bonus = sampling.sample(key_x, dist)
        p1, q1 = p[rows, 0, vs.first], vs.draft_q[rows, 0, vs.first]
        return n_acc, bonus, jnp.minimum(1.0, p1 / jnp.maximum(q1, 1e-30)), ok

    # ------------------------------------------------------------------ drafting

    def _draft(self, ctx: Ctx, vs: VerifyState, stats: Stats, L, anchor, bonus, key, use_lookup):
        """The drafter's next chain (run only if some row wants it) and the catch-up buffer after it."""
        model, heads, step, k = ctx.model, ctx.heads, ctx.step, self.k
        B, W = step.chunk.shape
        G = vs.gap_hidden.shape[1]
        active = ~ctx.st.done
        next_tokens = step.next_tokens(anchor, bonus)
        T = (heads.calibration[...] if getattr(heads, "calibration", None) is not None
             else jnp.full((k,), DEFAULT_TEMPERATURE, jnp.float32))[:k]
        sc = self.dc.sampling

        def sample(j, logits):
            return sampling.sample(jax.random.fold_in(key, j), sampling.probs(logits, sc))

        if self.budget is None:
            def after_step(c, D, fed):
                return fed, jnp.ones_like(fed)
            want = ~use_lookup
        else:
            probing = self.budget.probing(stats)

            def after_step(c, D, fed):
                feed, more = self.budget.after_step(self.budget.corrected(c, stats), D, fed, L)
                return feed, more & ~probing  # a probe drafts one step
            # rows whose drafting has not paid stop, but catch up (and look again) every PROBE_EVERY tokens
            want = active & ((~probing & ~use_lookup) | (vs.gap_n + anchor + 1 > PROBE_EVERY))

        def chain(hidden, nt, pos, anc, width):
            ch = run_chain(heads, model, hidden, nt, pos, anc, k, vs.draft_cache, step.draft_kernel,
                           None if self.greedy else sample, T, after_step, self.costs.draft_cost(width, 1),
                           self.costs.draft_step, want)
            return ch._replace(logits=jnp.zeros((B, k, 0)) if self.greedy else ch.logits)

        empty_gaps = dict(gap_hidden=vs.gap_hidden, gap_next=vs.gap_next, gap_n=jnp.zeros_like(vs.gap_n),
                          gap_pos=jnp.full_like(vs.gap_pos, PAD_SENTINEL))

        def skip(_):
            V = 0 if self.greedy else model.cfg.vocab_size
            zeros = jnp.zeros((B, k), jnp.float32)
            ch = Chain(jnp.zeros((B, k), jnp.int32), jnp.zeros((B, k, V)), zeros, zeros > 0,
                       jnp.zeros((B,), jnp.int32), jnp.zeros((B,)), jnp.zeros((B,), jnp.int32), vs.draft_cache,
                       jnp.zeros((B, k), jnp.int32), zeros)
            if not G:
                return ch, dict(empty_gaps, gap_n=vs.gap_n + jnp.where(active, anchor + 1, 0))
            slot = jnp.arange(W)[None, :]
            at = jnp.where((slot <= anchor[:, None]) & active[:, None], vs.gap_n[:, None] + slot, G)  # G: dropped
            rows = jnp.arange(B)[:, None]
            gaps = dict(gap_hidden=vs.gap_hidden.at[rows, at].set(step.hidden.astype(vs.gap_hidden.dtype),
                                                                  mode="drop"),
                        gap_next=vs.gap_next.at[rows, at].set(next_tokens, mode="drop"),
                        gap_pos=vs.gap_pos.at[rows, at].set(step.positions, mode="drop"),
                        gap_n=vs.gap_n + jnp.where(active, anchor + 1, 0))
            return ch, gaps

        if not self.heads_draft:
            return skip(None)
        if self.budget is None and self.dc.draft_source == "heads":
            return chain(step.hidden, next_tokens, step.positions, anchor, W), empty_gaps

        def draft(_):
            def narrow(_):
                return chain(step.hidden, next_tokens, step.positions, anchor, W)

            def wide(_):  # the rows' skipped positions first: their draft-cache entries are written now
                return chain(jnp.concatenate([vs.gap_hidden, step.hidden], 1),
                             jnp.concatenate([vs.gap_next, next_tokens], 1),
                             jnp.concatenate([vs.gap_pos, step.positions], 1), anchor + G, G + W)

            ch = jax.lax.cond(jnp.any(vs.gap_n > 0), wide, narrow, None) if G else narrow(None)
            return ch, empty_gaps

        return jax.lax.cond(jnp.any(want), draft, skip, None)

    def _merge_lookup_drafts(self, ch: Chain, lk, use_lookup, lstats: Stats, L) -> Chain:
        """Rows drafting from the context take the retrieved continuation, with the lookup's confidence."""
        if self.dc.draft_source == "heads":
            return ch
        k = self.k
        live = jnp.arange(k)[None, :] < lk.count[:, None]
        c0 = jnp.where(live, LOOKUP_CONF, 0.0)
        fed = []
        if self.budget is not None:  # the sequential feed flags of the retrieved drafts (sampling)
            c, f = self.budget.corrected(c0, lstats), lk.count > 0
            for j in range(k):
                f = self.budget.after_step(c[:, :j + 1], jnp.zeros_like(c[:, 0]), f, L)[0] & live[:, j]
                fed.append(f)
        fed = jnp.stack(fed, 1) if fed else live
        pick = lambda a, b: jnp.where(use_lookup.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)  # noqa: E731
        return ch._replace(tokens=pick(lk.tokens, ch.tokens), conf=pick(c0, ch.conf), fed=pick(fed, ch.fed),
                           steps=pick(lk.count, ch.steps), cost=pick(jnp.zeros_like(ch.cost), ch.cost))

    def _how_many_siblings(self, ch: Chain, m, stats: Stats, use_lookup, L) -> jax.Array | int:
        """Siblings the next pass feeds beside its m drafts [B] (0 without a tree): at most one per fed depth
        and none for drafts from the context. Under the budget, the n that maximises the value with each
        sibling's expected tokens, a_{j-1} (1 - c_j) s_j, where s_j = P(runner-up | draft j wrong) is read
        from the calibrated confidences; fixed budgets feed them all."""
        T = self.tree
        if not T:
            return 0
        cap = jnp.where(use_lookup, 0, jnp.minimum(m, T)).astype(jnp.int32)
        if self.budget is None:
            return cap
        c = self.budget.corrected(ch.conf, stats)  # [B, k]
        a = jnp.cumprod(c, 1)
        a_prev = jnp.concatenate([jnp.ones_like(a[:, :1]), a[:, :-1]], 1)
        s = jnp.clip(ch.second_conf / jnp.maximum(1.0 - ch.conf, 1e-6), 0.0, 1.0)
        gain = jnp.concatenate([jnp.zeros_like(c[:, :1]), jnp.cumsum((a_prev * (1 - c) * s)[:, :T], 1)], 1)
        tokens = 1.0 + jnp.take_along_axis(jnp.concatenate([jnp.zeros_like(a[:, :1]), jnp.cumsum(a, 1)], 1),
                                           m[:, None], 1)  # [B, 1] the chain's expected tokens
        P = jnp.asarray(self.slot_costs, jnp.float32)
        n = jnp.arange(T + 1)[None, :]
        cost = P[jnp.clip(m[:, None] + n, 0, P.shape[0] - 1)] + ch.cost[:, None]  # width m + 1 + n
        value = jnp.where(n <= cap[:, None], tokens + gain - L[:, None] * cost, -jnp.inf)
        return jnp.argmax(value, 1).astype(jnp.int32)

    def _how_many(self, ch: Chain, stats: Stats, active, use_lookup, lstats: Stats, L) -> jax.Array:
        """Drafts the next pass feeds per row [B]; rows are topped up to the widest row's count for free
        (the batch runs at that width anyway) from the drafts they computed."""
        k = self.k
        if self.dc.draft_budget == "fixed":
            m = ch.steps
        elif self.dc.draft_budget == "clp":
            m = jnp.where(use_lookup, ch.steps, jnp.minimum(ch.clp_count, ch.steps))
        else:
            c = jnp.where(use_lookup[:, None], self.budget.corrected(ch.conf, lstats),
                          self.budget.corrected(ch.conf, stats))
            m = self.budget.choose(c, ch.steps, ch.cost, ch.fed, L)
            m = jnp.where(self.budget.probing(stats) & ~use_lookup, 0, m)  # a probe only looks
        m = jnp.minimum(m, jnp.minimum(ch.steps, k)).astype(jnp.int32)
        widest = jnp.max(jnp.where(active, m, 0))
        return jnp.maximum(m, jnp.minimum(ch.steps, widest)).astype(jnp.int32)
