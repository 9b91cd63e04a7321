"""Room: `verify`'s draft budget; pure arithmetic on confidences, costs and its own per-row Stats.

How many drafts to compute and to feed, from confidences and measured costs.

A row's next pass feeds m drafts after its bonus token (m+1 slots). With a_i the chance that drafts 1..i
are all accepted, it commits 1 + sum_{i<=m} a_i tokens in expectation and costs P(m+1) + D (the pass at
that width and the drafting spent; decode/pass_costs.py). What counts is the row's long-run rate, tokens
per cost over all its passes, not each pass's own: the budget feeds the m in 0..k that maximises the pass's
value V(m) = 1 + A_m - L (P(m+1) + D), with L the row's rate so far (Dinkelbach's rule: a policy that
maximises tokens - L x cost at L = its own rate maximises the rate; L is a discounted tokens / cost of the
row's passes, starting from RATE_INIT). m = 0 is an `ar`-cost pass. Scoring each pass by its own ratio
instead (the rule before 2026-12-07) fed a draft only where it beat that pass's ratio, which the drafting
cost D already spent lowers: it fed too little.

* a_i = c'_1 ... c'_i, c'_j = min(1, f_j * c_j): c_j is draft j's calibrated top-1 probability
  softmax(logits_j / T_j) (`Heads.calibration`, else DEFAULT_TEMPERATURE) and f_j a per-row correction
  learnt online from the drafts this row has seen verified at depth j ((hits + PRIOR) / (sum c + PRIOR)).
* The chain drafts one more step only while its look-ahead (the next drafts assumed as sure as the last,
  one draft step each) beats the best value it already has.
* Whether to draft at all: each row keeps a running mean of what drafting gained it, in `ar` passes
  (accepted drafts - extra pass cost - drafting cost; a prior of GAIN_PRIOR passes, then forgetting slowly, so
  a few misses do not stop a row whose drafts pay on average); below -STOP_MARGIN the row stops drafting and decodes at
  `ar` cost, drafting again every PROBE_EVERY tokens to check. A probe only looks: it drafts one step,
  feeds nothing (an `ar`-cost pass), and the pass checks its draft for free; its gain is what feeding it
  would have earned (right - (P(2) - P(1)) - drafting cost), so hopeless drafts cost a probe no more than
  its one draft step.

Lossless with sampling: whether draft j is fed depends only on the distributions of drafts 1..j (which
depend on the tokens drawn before j), never on the token drawn at j, so speculative sampling's acceptance
test stays exact. Greedy output is `ar`'s whatever is fed, so greedy rows feed the argmax over the drafts
computed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TEMPERATURE = 1.5  # uncalibrated heads: their first draft's 0.97 is right 0.75 of the time (DESIGN 8)
# pseudo-observations of the online confidence correction: how far the row's own verified drafts may move the
# calibration. Measured (HumanEval 100-107 + 6 chat prompts outside the bench, shipped heads, k=3, cost per token in
# one-slot passes): PRIOR 1 / 2 / 5 / 10 / 20 -> 0.833 / 0.806 / 0.792 / 0.799 / 0.800 (at 1 a few misses stop a
# row's drafting). Since probes only look, a row whose drafts are always wrong costs +1.7% over `ar` at 5
# (tests/test_budget.py; +5.9% when probes fed their drafts).
PRIOR = 5.0
DISCOUNT = 0.9  # per observation, older verified drafts count less (the text changes)
GAIN_INIT = 0.25  # drafting starts on
# The gain is the mean of a row's drafting passes with GAIN_INIT as GAIN_PRIOR pseudo-passes (so a row whose drafts
# are never right stops after two passes), forgetting at GAIN_RATE once it has seen enough: one pass feeding three
# wrong drafts weighs -0.5, so a fast-forgetting mean (0.3, before 2026-12-06) stopped rows whose drafts paid on
# average after a couple of misses, for PROBE_EVERY tokens at ar cost each time (51% of the passes on 20 unseen
# prompts; 0.778 one-slot passes per token against 0.731 at 0.1 and 0.728 at 0.05: tools/budget_sweep.py).
GAIN_PRIOR = 2.0
GAIN_RATE = 0.05
PROBE_EVERY = 8  # a row that stopped drafting drafts again after this many committed tokens
# A probe is the row's only look at its drafts in PROBE_EVERY tokens, so it weighs as many passes would: at
# GAIN_RATE alone a stopped row whose drafts had turned good needed several right probes (dozens of tokens at
# `ar` cost) to resume; on the bench's code prompts stops then cost 4.5% (tools/budget_sweep.py, 2026-12-07).
PROBE_WEIGHT = PROBE_EVERY * GAIN_RATE
# A row stops drafting once drafting has lost it more than this (ar passes per drafting pass), not as soon as it
# has gained nothing: a row near break-even feeds on. tools/budget_sweep.py, 2026-12-07 (cost per token, stop at
# 0 / -0.1 / -0.25 / never): dev prompts 0.720 / 0.716 / 0.713 / 0.713, the bench's own 0.737 / 0.721 / 0.719;
# drafts that are never right (tests/test_budget.py) +1.2% / +1.7% / +3.3% over `ar`.
STOP_MARGIN = 0.1
# The row's rate L (tokens per one-slot pass) starts as RATE_PRIOR pseudo-passes at RATE_INIT, then follows its
# passes, older ones (and the prior) discounted by RATE_DISCOUNT each.
RATE_INIT = 1.2
RATE_PRIOR = 2.0
RATE_DISCOUNT = 0.95


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stats:
    """Per row: what the budget has learnt."""

    hit: jax.Array  # [B, k] discounted count of verified drafts right at depth j (earlier ones right)
    seen: jax.Array  # [B, k] discounted sum of those drafts' calibrated confidences
    gain: jax.Array  # [B] running mean gain of drafting, in ar passes per drafting pass
    drafting: jax.Array  # [B] drafting passes the gain has seen
    # the row's rate, kept in the drafter's Stats only (verify accounts every pass there, whatever its source)
    made: jax.Array  # [B] discounted tokens the row's passes committed (RATE_PRIOR x RATE_INIT to start)
    paid: jax.Array  # [B] ... and their discounted cost, pass and drafting, in one-slot passes (RATE_PRIOR)

    @classmethod
    def init(cls, B: int, k: int) -> "Stats":
        full = lambda v: jnp.full((B,), v, jnp.float32)  # noqa: E731
        return cls(jnp.zeros((B, k), jnp.float32), jnp.zeros((B, k), jnp.float32), full(GAIN_INIT), full(0.0),
                   full(RATE_PRIOR * RATE_INIT), full(RATE_PRIOR))

    def rate(self) -> jax.Array:
        """[B] the row's long-run tokens per one-slot pass, L."""
        return self.made / self.paid


def confidence(logits: jax.Array, temperature) -> jax.Array:
    """Calibrated top-1 probability of draft logits [..., V] (temperature: scalar or broadcastable)."""
    logits = logits.astype(jnp.float32)
    t = jnp.asarray(temperature, jnp.float32)
    return jnp.exp(jnp.max(jax.nn.log_softmax(logits / t[..., None], -1), -1))


class Budget:
    """The rule, with this machine's costs baked in (static: one per compiled program).

    Args:
      widths: [k+1] cost of a pass feeding 1..k+1 slots per row (flat when the decoder does not adapt its width).
      step: cost of one further draft step.
      greedy: greedy rows feed the best m over the drafts computed; sampled rows feed the sequentially
        accepted prefix (see the module docstring).
    """

    def __init__(self, widths, step: float, k: int, greedy: bool):
        self.P = np.asarray(widths, np.float32)[:k + 1]
        if self.P.shape != (k + 1,):
            raise ValueError(f"Budget needs the cost of widths 1..{k + 1}, got {widths}.")
        self.s, self.k, self.greedy = float(step), k, greedy

    def corrected(self, conf: jax.Array, stats: Stats) -> jax.Array:
        """c' [B, j] from calibrated confidences [B, j] and the row's online correction."""
        j = conf.shape[1]
        f = (stats.hit[:, :j] + PRIOR) / (stats.seen[:, :j] + PRIOR)
        return jnp.minimum(conf * f, 1.0)

    def values(self, c: jax.Array, D: jax.Array, L: jax.Array) -> jax.Array:
        """V(m) for m = 0..j [B, j+1] from corrected confidences c [B, j], drafting cost D [B] and rate L [B]."""
        j = c.shape[1]
        a = jnp.cumprod(c, axis=1)
        tokens = 1.0 + jnp.concatenate([jnp.zeros_like(a[:, :1]), jnp.cumsum(a, 1)], axis=1)  # [B, j+1]
        return tokens - L[:, None] * (jnp.asarray(self.P[:j + 1])[None, :] + D[:, None])

    def lookahead(self, c: jax.Array, D: jax.Array, L: jax.Array) -> jax.Array:
        """[B] the best value over m > j if drafting on, each further draft as sure as the last (one step each)."""
        j = c.shape[1]
        if j >= self.k:
            return jnp.full(c.shape[:1], -jnp.inf)
        a = jnp.cumprod(c, axis=1)
        A, last, sure = jnp.sum(a, 1), a[:, -1], c[:, -1]
        best = jnp.full(c.shape[:1], -jnp.inf)
        extra = jnp.zeros_like(A)
        for t in range(1, self.k - j + 1):
            extra = extra + last * sure ** t
            best = jnp.maximum(best, 1.0 + A + extra - L * (self.P[j + t] + D + t * self.s))
        return best

    def after_step(self, c: jax.Array, D: jax.Array, fed: jax.Array, L: jax.Array) -> tuple[jax.Array, jax.Array]:
        """After draft j (c [B, j]; D: drafting so far; fed: drafts 1..j-1 accepted for feeding so far; L: the
        row's rate): (feed draft j [B], draft one more [B])."""
        v = self.values(c, D, L)  # [B, j+1]
        ahead = self.lookahead(c, D, L)
        before = jnp.max(v[:, :-1], axis=1)
        feed = fed & (jnp.maximum(v[:, -1], ahead) >= before)
        return feed, feed & (ahead > jnp.max(v, axis=1))

    def choose(self, c: jax.Array, steps: jax.Array, D: jax.Array, fed: jax.Array, L: jax.Array) -> jax.Array:
        """Drafts to feed [B]: greedy, the best m <= steps over all computed; sampled, the fed prefix."""
        if not self.greedy:
            return jnp.sum(fed, axis=1).astype(jnp.int32)
        v = self.values(c, D, L)
        v = jnp.where(jnp.arange(self.k + 1)[None, :] <= steps[:, None], v, -jnp.inf)
        return jnp.argmax(v, axis=1).astype(jnp.int32)

    @staticmethod
    def probing(stats: Stats) -> jax.Array:
        """[B] rows whose drafting has lost (more than STOP_MARGIN per pass): they draft only to look (one step,
        nothing fed)."""
        return stats.gain <= -STOP_MARGIN

    def observe(self, stats: Stats, conf: jax.Array, fed: jax.Array, n_acc: jax.Array,
                extra: tuple[jax.Array, jax.Array], drafted: jax.Array, cost: jax.Array, active: jax.Array) -> Stats:
        """Updates a row's statistics after a pass verified its `fed` [B] drafts (confidences conf [B, k],
        n_acc accepted). `extra` = (observed [B], right [B]): the first draft when it was computed but not
        fed, checked against the backbone's token for free (greedy: 0/1; sampled: its acceptance
        probability). `drafted` [B]: the row drafted for this pass, at `cost` [B] (drafting only). `stats`
        are the ones the pass was planned with, so a probing row's pass was a probe."""
        k = self.k
        j = jnp.arange(k)[None, :]
        seen_now = (j < fed[:, None]) & (j <= n_acc[:, None])  # verified with every earlier draft right
        right = (j < n_acc[:, None]).astype(jnp.float32)
        obs, ok = extra
        seen_now = seen_now.at[:, 0].set(seen_now[:, 0] | obs)
        right = right.at[:, 0].set(jnp.where(obs, ok, right[:, 0]))
        upd = seen_now & active[:, None]
        hit = jnp.where(upd, DISCOUNT * stats.hit + right, stats.hit)
        seen = jnp.where(upd, DISCOUNT * stats.seen + conf, stats.seen)
        extra_pass = jnp.asarray(self.P)[fed] - self.P[0]
        g = n_acc.astype(jnp.float32) - extra_pass - cost
        g = jnp.where(self.probing(stats) & obs, ok - (self.P[1] - self.P[0]) - cost, g)  # what feeding it would earn
        counted = drafted & active
        w = jnp.maximum(1.0 / (stats.drafting + 1.0 + GAIN_PRIOR), GAIN_RATE)  # the newest pass's weight
        w = jnp.where(self.probing(stats), jnp.maximum(w, PROBE_WEIGHT), w)  # a probe speaks for PROBE_EVERY
        gain = jnp.where(counted, (1 - w) * stats.gain + w * g, stats.gain)
        return dataclasses.replace(stats, hit=hit, seen=seen, gain=gain, drafting=stats.drafting + counted)

    @staticmethod
    def account(stats: Stats, tokens: jax.Array, spent: jax.Array, active: jax.Array) -> Stats:
        """The row's rate after a pass that committed `tokens` [B] at cost `spent` [B] (pass and drafting)."""
        made = jnp.where(active, RATE_DISCOUNT * stats.made + tokens, stats.made)
        paid = jnp.where(active, RATE_DISCOUNT * stats.paid + spent, stats.paid)
        return dataclasses.replace(stats, made=made, paid=paid)
