"""Terminal output of decode.py: streaming, statistics, the ar comparison and the chat loop."""

from __future__ import annotations

import sys
import time
from typing import Sequence

import numpy as np

from clp_jax.decode import pass_costs
from clp_jax.decode.decoder import Decoder, DecodeResult, _bucket
from clp_jax.decode.prompts import encode


def stream_one(decoder: Decoder, tok, prompt: Sequence[int], seed: int = 0, out=sys.stdout) -> DecodeResult:
    """Decodes one prompt, printing text as tokens commit; timings exclude compilation."""
    decoder.costs(1)  # first use on this machine: measured before the clock starts
    compile0, t0 = decoder.compile_seconds, time.perf_counter()
    printed, first, st, tokens = "", None, None, [[]]
    for tokens, st in decoder.stream([prompt], seed=seed):
        if first is None:
            first = (time.perf_counter() - t0) - (decoder.compile_seconds - compile0)
        text = tok.decode(tokens[0])
        if len(text) > len(printed) and not text.endswith("\ufffd"):  # wait for whole characters
            out.write(text[len(printed):])
            out.flush()
            printed = text
    out.write(tok.decode(tokens[0])[len(printed):] + "\n")  # the last yield is the final state
    total = (time.perf_counter() - t0) - (decoder.compile_seconds - compile0)
    return decoder.result_of(st, 1, first, total - first)


def policy(results: Sequence[DecodeResult]) -> dict:
    """How the drafts were budgeted over some results: drafts fed per pass (shares, index = drafts), the share
    of ar-cost passes (no draft fed), the fed drafts' sources, and the run's cost per generated token in
    one-slot passes from the pass-cost table (ar: 1.0; loop passes and their tokens, the prefill excluded)."""
    fed = sum(r.fed.sum(0) for r in results)
    source = sum(r.source.sum(0) for r in results)
    passes = max(int(fed.sum()), 1)
    tokens = sum(r.num_tokens - len(r.tokens) for r in results)  # the prefill commits each row's first token
    return {"fed_share": [round(float(x) / passes, 4) for x in fed], "ar_cost_share": round(float(fed[0]) / passes, 4),
            "drafts_per_pass": round(float((fed * np.arange(len(fed))).sum()) / passes, 3),
            "source_share": {"heads": round(float(source[0]) / max(int(source.sum()), 1), 4),
                             "lookup": round(float(source[1]) / max(int(source.sum()), 1), 4)},
            "draft_steps_per_pass": round(float(sum(r.draft_steps.sum() for r in results)) / passes, 3),
            "cost_per_token": round(float(sum(r.cost.sum() for r in results)) / max(tokens, 1), 4),
            "siblings": _siblings(results, passes)}


def _siblings(results: Sequence[DecodeResult], passes: int) -> dict | None:
    """The draft tree's siblings: fed per pass and the share of them accepted (None: no tree ran)."""
    trees = [r.tree for r in results if r.tree is not None]
    fed, ok = (sum(t.sum(0) for t in trees) if trees else (0, 0))
    if not fed:
        return None
    return {"per_pass": round(float(fed) / passes, 3), "accepted": round(float(ok) / float(fed), 4)}


def policy_line(results: Sequence[DecodeResult]) -> str:
    p = policy(results)
    hist = " ".join(f"{m}:{100 * f:.0f}%" for m, f in enumerate(p["fed_share"]))
    src = p["source_share"]
    sib = p["siblings"]
    tree = f" | siblings {sib['per_pass']:.2f} per pass, {100 * sib['accepted']:.0f}% accepted" if sib else ""
    return (f"drafts fed per pass {hist} (ar-cost passes {100 * p['ar_cost_share']:.0f}%; from heads "
            f"{100 * src['heads']:.0f}%, lookup {100 * src['lookup']:.0f}%) | draft steps per pass "
            f"{p['draft_steps_per_pass']:.2f}{tree} | measured cost {p['cost_per_token']:.3f} one-slot passes per token")


def stats_line(mode: str, results: Sequence[DecodeResult], decoder: Decoder) -> str:
    tokens = sum(r.num_tokens for r in results)
    seconds = sum(r.decode_seconds + r.prefill_seconds for r in results)
    passes = sum(int(r.passes.sum()) for r in results)
    offered = sum(r.offered.sum(0) for r in results)
    accepted = sum(r.accepted.sum(0) for r in results)
    acc = np.where(offered > 0, accepted / np.maximum(offered, 1), 0.0)
    heads = " ".join(f"{a:.2f}" for a in acc) if mode != "ar" else "-"
    line = (f"[{mode}] {tokens} tokens in {seconds:.2f} s: {tokens / max(seconds, 1e-9):.2f} tokens/s | "
            f"{tokens / max(passes, 1):.2f} tokens per pass | head acceptance {heads} | "
            f"compile {decoder.compile_seconds:.1f} s")
    if mode == "verify":
        line += "\n[verify] " + policy_line(results)
    return line


def compare(decoder: Decoder, ar: Decoder, batches, tok, seed: int = 0, repeats: int = 3, out=None) -> int:
    """Decodes every batch with the mode and with ar, `repeats` times with the order alternating (so a slow
    second on a shared machine lands on both), and prints the median speedup with its spread, and exact match.
    A median below 1 comes with the reason in one line (acceptance, tokens per pass, pass costs)."""
    out = out or sys.stdout  # looked up now: a caller (or pytest) may have replaced it since import
    rounds = []  # per repeat: (mode results, ar results)
    for r in range(repeats):
        mine, ref = [], []
        for batch in batches:
            first, second = (decoder, ar) if r % 2 == 0 else (ar, decoder)
            a = first.generate(batch, seed=seed)
            b = second.generate(batch, seed=seed)
            mine.append(a if first is decoder else b)
            ref.append(b if first is decoder else a)
        rounds.append((mine, ref))
    mine, ref = rounds[0]
    for batch, res in zip(batches, mine):
        for p, t in zip(batch, res.tokens):
            print(f"--- prompt: {tok.decode(p)!r}\n{tok.decode(t)}", file=out)
    same = [a == b for m, q in rounds for r, s in zip(m, q) for a, b in zip(r.tokens, s.tokens)]
    same_prompts = [all(x) for x in zip(*[[a == b for r, s in zip(m, q) for a, b in zip(r.tokens, s.tokens)]
                                          for m, q in rounds])]

    def rate(results, prefill: bool) -> float:  # tokens per second: lossy modes may stop at other lengths
        seconds = sum(r.decode_seconds + (r.prefill_seconds if prefill else 0.0) for r in results)
        return sum(r.num_tokens for r in results) / max(seconds, 1e-9)

    decode_x = [rate(m, False) / rate(q, False) for m, q in rounds]
    e2e_x = [rate(m, True) / rate(q, True) for m, q in rounds]
    every_mine = [r for m, _ in rounds for r in m]
    every_ref = [r for _, q in rounds for r in q]
    print(stats_line(decoder.dc.mode, every_mine, decoder), file=out)
    print(stats_line("ar", every_ref, ar), file=out)
    costs = None
    if decoder.dc.mode == "verify":
        bucket = _bucket(len(batches[0]), 1)
        cache_len = decoder.capacity_for(batches[0])
        costs = decoder.costs(bucket, cache_len)
        print(costs.format().replace("\n", " | "), file=out)
        # each run is held to the ar run of the same batch in the same round (one-slot passes timed beside it)
        check = decoder.clock_beside_ar((r, _bucket(len(b), 1), decoder.capacity_for(b), a.ms_per_pass)
                                        for m, q in rounds for r, a, b in zip(m, q, batches))
        if check is not None:
            print(f"[verify] {check.format()}", file=out)
        # a table timed under another load is re-timed next run
        steps = sum(max(int(r.passes.max()) - 1, 1) for r in every_ref)  # batched passes (the prefill excluded)
        ar_ms = 1e3 * sum(r.decode_seconds for r in every_ref) / steps
        note = pass_costs.check_against(decoder.model, bucket, costs, ar_ms, cache_len=cache_len)
        if note:
            print(note, file=out)
    med, med_e2e = float(np.median(decode_x)), float(np.median(e2e_x))
    print(f"speedup over ar (tokens/s ratio, median of {repeats} interleaved runs): {med:.2f}x decode "
          f"(spread {min(decode_x):.2f}-{max(decode_x):.2f}), {med_e2e:.2f}x end to end "
          f"(spread {min(e2e_x):.2f}-{max(e2e_x):.2f})", file=out)
    print(f"exact match {np.mean(same_prompts):.2f} ({sum(same_prompts)}/{len(same_prompts)} prompts identical to "
          f"ar in every run)", file=out)
    if med < 1.0:
        print(why_slower(decoder.dc.mode, every_mine, costs), file=out)
    return 0


def why_slower(mode: str, results: Sequence[DecodeResult], costs) -> str:
    """One line on why a mode did not beat ar: what it committed per pass against what its passes cost."""
    tokens = sum(r.num_tokens for r in results)
    passes = sum(int(r.passes.sum()) for r in results)
    offered = sum(r.offered.sum(0) for r in results)
    accepted = sum(r.accepted.sum(0) for r in results)
    first = float(accepted[0]) / max(int(offered[0]), 1) if len(offered) else 0.0
    line = (f"why slower: {mode} committed {tokens / max(passes, 1):.2f} tokens per pass (first draft right "
            f"{first:.2f} of the time)")
    if costs is not None:
        p = policy(results)
        line += (f", at {p['cost_per_token']:.2f} one-slot passes per token from this machine's pass costs "
                 f"(2-{len(costs.width)} slots cost {min(costs.width[1:]):.2f}-{max(costs.width[1:]):.2f}x one); "
                 "drafts pay only where they are right more often than a wider pass costs extra")
    return line + "."


def chat_loop(decoder: Decoder, tok, seed: int = 0, stdin=None) -> int:
    """Chat with the chat template, one user turn per line of stdin. At a terminal an empty line, 'exit',
    'quit' or EOF ends it; from a pipe or file each non-empty line is a turn (echoed after 'you> ', so the
    transcript reads in order) until 'exit', 'quit' or the end of the input."""
    stdin = stdin or sys.stdin
    interactive = stdin.isatty()
    messages = []
    while True:
        if interactive:
            try:
                line = input("\nyou> ").strip()
            except EOFError:
                return 0
            if not line:
                return 0
        else:
            raw = stdin.readline()
            if not raw:  # end of the piped input
                return 0
            line = raw.strip()
            if not line:
                continue
            print(f"\nyou> {line}", flush=True)
        if line in ("exit", "quit"):
            return 0
        messages.append({"role": "user", "content": line})
        ids = encode(tok, messages, chat=True)
        decoder.check_prompts([ids])
        print("assistant> ", end="", flush=True)
        res = stream_one(decoder, tok, ids, seed=seed)
        reply = tok.decode(res.tokens[0], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        print(stats_line(decoder.dc.mode, [res], decoder), file=sys.stderr)
