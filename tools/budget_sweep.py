"""Draft-budget rules side by side on prompts the bench never uses, by their modelled cost per token.

  python tools/budget_sweep.py --rules current,ratio,fixed,value@1.2,current+no-stop --new 96

Greedy decoding is deterministic, so a rule's choices (how many drafts each pass feeds, when a row stops
drafting) and the cost the pass-cost table puts on them do not depend on the machine's load: a sweep can run
beside other jobs and still rank rules (the table's model agrees with the loop's clock within a few percent,
`python -m clp_jax.bench` prints both). Every rule decodes the same prompts (12 HumanEval problems after the
bench's first 20, raw; 8 chat requests that are neither bench nor training prompts) with the shipped drafter
and `verify` (drafter + lookup), and the table prints cost per token (ar = 1), tokens per pass and the share of
`ar`-cost passes. Rules:

  current        the library's budget (decode/budget.py): each pass valued at tokens - L x cost, L the row's rate
  no-stop        the same, rows never stop drafting (the gain test off)
  fixed          every draft fed (`--draft-budget fixed`, source both)
  value@L        L fixed (tokens per one-slot pass) instead of the row's own rate
  ratio          each pass scored by its own tokens / cost (the rule before 2026-12-07)
  gain@R         the running mean of drafting's gain (whether a row drafts at all) forgets at R (budget.GAIN_RATE:
                 the newest pass's weight once the row has seen 1 / R - GAIN_PRIOR - 1 drafting passes)
  prior@N        the gain's prior weighs N passes (budget.GAIN_PRIOR)
  margin@X       a row stops drafting only once its gain is below -X (budget.STOP_MARGIN)
  A+B            both changes, e.g. ratio+no-stop
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from clp_jax.bench import quality, run  # noqa: E402
from clp_jax.cli import options  # noqa: E402
from clp_jax.decode import budget  # noqa: E402
from clp_jax.decode.decoder import DecodeConfig, Decoder  # noqa: E402
from clp_jax.decode.prompts import encode  # noqa: E402
from clp_jax.weights import loading  # noqa: E402

# everyday requests that are neither bench prompts (prompts.CHAT_PROMPTS) nor decode.py's defaults
DEV_CHAT = (
    "Explain what a compiler does, in two short paragraphs.",
    "Write a haiku about autumn rain and then explain its imagery.",
    "List five ways to reduce food waste at home, with one sentence on each.",
    "How does compound interest work? Give a small worked example.",
    "Write a short dialogue between a cat and a dog arguing about the sofa.",
    "What should I check before buying a used bicycle?",
    "Describe the water cycle for a ten-year-old.",
    "Write a Python function that counts the vowels in a string, and explain it.",
)


def prompts(tokenizer, n_code: int, n_chat: int, bench: bool = False) -> list[tuple[str, list[int]]]:
    """The dev prompts (never the bench's), or with `bench` the bench's own (to explain a bench figure: a rule
    chosen on them would be fitted to the test)."""
    if bench:
        samples = run.load_samples(tokenizer, ("humaneval", "chat"), 20)
        return [("code" if s.set == "humaneval" else "chat", s.ids) for s in samples]
    problems = quality.humaneval_problems(20 + n_code)[20:]
    out = [("code", encode(tokenizer, p["prompt"], chat=False)) for p in problems]
    return out + [("chat", encode(tokenizer, t, chat=True)) for t in DEV_CHAT[:n_chat]]


def decoder_for(rule: str, backbone, heads, k: int, new: int) -> Decoder:
    fixed = "fixed" in rule.split("+")
    dc = DecodeConfig(mode="verify", k=k, max_new_tokens=new, draft_budget="fixed" if fixed else "auto",
                      draft_source="both")
    return Decoder(backbone.model, heads, dc, backbone.eos_token_ids)


def _ratio_rule():
    """Budget.values / Budget.lookahead scoring a pass by its own tokens / cost (after_step and choose compare
    scores only, so the rest of the rule is unchanged)."""
    def values(self, c, D, L):
        j = c.shape[1]
        a = jnp.cumprod(c, axis=1)
        tokens = 1.0 + jnp.concatenate([jnp.zeros_like(a[:, :1]), jnp.cumsum(a, 1)], axis=1)
        return tokens / (jnp.asarray(self.P[:j + 1])[None, :] + D[:, None])

    def lookahead(self, c, D, L):
        j = c.shape[1]
        if j >= self.k:
            return jnp.full(c.shape[:1], -jnp.inf)
        a = jnp.cumprod(c, axis=1)
        A, last, sure = jnp.sum(a, 1), a[:, -1], c[:, -1]
        best, extra = jnp.full(c.shape[:1], -jnp.inf), jnp.zeros_like(A)
        for t in range(1, self.k - j + 1):
            extra = extra + last * sure ** t
            best = jnp.maximum(best, (1.0 + A + extra) / (self.P[j + t] + D + t * self.s))
        return best

    return values, lookahead


def run_rule(rule: str, backbone, heads, k: int, new: int, samples) -> dict:
    real = (budget.Budget.__dict__["probing"], budget.Budget.values, budget.Budget.lookahead, budget.GAIN_RATE,
            budget.Stats.rate, budget.GAIN_PRIOR, budget.STOP_MARGIN)
    for part in rule.split("+"):
        if part == "no-stop":
            budget.Budget.probing = staticmethod(lambda stats: stats.gain < -1e9)
        elif part.startswith("margin@"):
            budget.STOP_MARGIN = float(part[7:])
        elif part.startswith("value@"):
            budget.Stats.rate = lambda self, L=float(part[6:]): jnp.full_like(self.made, L)
        elif part == "ratio":
            budget.Budget.values, budget.Budget.lookahead = _ratio_rule()
        elif part.startswith("prior@"):
            budget.GAIN_PRIOR = float(part[6:])
        elif part.startswith("gain@"):
            budget.GAIN_RATE = float(part[5:])
        elif part not in ("current", "fixed"):
            raise ValueError(f"unknown rule part {part!r}")
    try:
        dec = decoder_for(rule, backbone, heads, k, new)
        rows = {}
        t0 = time.perf_counter()
        for kind, ids in samples:  # tracing happens inside the first call, with the rule in place
            res = dec.generate([ids])
            r = rows.setdefault(kind, {"tokens": 0, "passes": 0, "cost": 0.0, "ar_cost": 0, "loop": 0})
            r["tokens"] += res.num_tokens
            r["passes"] += int(res.passes.sum())
            r["cost"] += float(res.cost.sum())
            r["ar_cost"] += int(res.fed[:, 0].sum()) if res.fed is not None else 0
            r["loop"] += int(res.fed.sum()) if res.fed is not None else 0
    finally:
        (budget.Budget.probing, budget.Budget.values, budget.Budget.lookahead, budget.GAIN_RATE,
         budget.Stats.rate, budget.GAIN_PRIOR, budget.STOP_MARGIN) = real
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", default="current,no-stop,fixed")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--heads", default=None)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--new", type=int, default=96, help="new tokens per prompt")
    ap.add_argument("--code", type=int, default=12)
    ap.add_argument("--chat", type=int, default=8)
    ap.add_argument("--bench-prompts", action="store_true",
                    help="the bench's own prompts (20 HumanEval + 8 chat), to explain a bench figure")
    args = ap.parse_args(argv)
    options.setup_logging()
    backbone = loading.load_backbone(args.model)
    heads = options.build_heads(options.heads_source(args.heads, args.model, "verify"), backbone.cfg, args.k)
    samples = prompts(backbone.tokenizer, args.code, args.chat, args.bench_prompts)
    print(f"{len(samples)} prompts, {args.new} new tokens, k={args.k}; cost per token in one-slot passes "
          "(pass-cost table), lower is better")
    print(f"{'rule':16s} {'set':5s} {'cost/token':>10s} {'tokens/pass':>11s} {'ar-cost passes':>14s}")
    for rule in args.rules.split(","):
        out = run_rule(rule, backbone, heads, args.k, args.new, samples)
        tot = {key: sum(r[key] for r in out["rows"].values()) for key in ("tokens", "passes", "cost", "ar_cost",
                                                                          "loop")}
        for kind, r in list(out["rows"].items()) + [("all", tot)]:
            print(f"{rule:16s} {kind:5s} {r['cost'] / max(r['tokens'], 1):10.3f} "
                  f"{r['tokens'] / max(r['passes'], 1):11.2f} {r['ar_cost'] / max(r['loop'], 1):14.0%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
