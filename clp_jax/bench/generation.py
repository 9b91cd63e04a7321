"""How fast self-distillation data is made: greedy generation with and without recording, side by side.

  python -m clp_jax.bench.generation --batches 8,16,32 --new-tokens 192

Decodes the same real chat prompts (the training set's, through the chat template) in one process three
ways (no recording, the trunk's hidden states, hidden states plus the top-K next-token distribution) at
each batch size, through the continuous batching the data job uses (finished rows refilled with the next
prompts), and once the old way for reference (`Decoder.generate` over fixed batches, each running until its
slowest row ends). Prints targets/s (generated tokens per second, prefill included, compilation excluded),
the share of row-steps that produced a token, and each way's cost against no recording at the same batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time

import jax
import numpy as np

from clp_jax.decode import batching
from clp_jax.decode.decoder import DecodeConfig, Decoder
from clp_jax.decode.prompts import encode
from clp_jax.train import prompts as prompts_lib
from clp_jax.weights import loading

WAYS = {"plain": (False, 0), "hidden": (True, 0), "hidden+top8": (True, 8)}


def chat_prompts(tokenizer, n: int, offset: int) -> list[list[int]]:
    texts = prompts_lib.chat_requests(0)[offset:offset + n]
    return [encode(tokenizer, t, chat=True) for t in texts]


def run_stream(backbone, prompts, batch: int, new_tokens: int, way: str) -> dict:
    hidden, topk = WAYS[way]
    dc = DecodeConfig(mode="ar", max_new_tokens=new_tokens, record_hidden=hidden, record_topk=topk)
    dec = Decoder(backbone.model, None, dc, backbone.eos_token_ids)
    stats = batching.StreamStats()
    rows = list(batching.stream(dec, prompts, batch, stats=stats))
    tokens = sum(len(r.tokens) for r in rows)
    return {"batch": batch, "way": way, "batching": "continuous", "tokens": tokens, "seconds": stats.seconds,
            "targets_per_s": tokens / stats.seconds, "occupancy": stats.occupancy, "refills": stats.refills,
            "compile_seconds": stats.compile_seconds}


def run_fixed(backbone, prompts, batch: int, new_tokens: int) -> dict:
    dec = Decoder(backbone.model, None, DecodeConfig(mode="ar", max_new_tokens=new_tokens), backbone.eos_token_ids)
    tokens, seconds, row_steps = 0, 0.0, 0
    for s in range(0, len(prompts), batch):
        res = dec.generate(prompts[s:s + batch])
        tokens += res.num_tokens
        seconds += res.prefill_seconds + res.decode_seconds
        row_steps += len(res.tokens) * int(res.passes.max() - 1)
    return {"batch": batch, "way": "plain", "batching": "fixed", "tokens": tokens, "seconds": seconds,
            "targets_per_s": tokens / seconds, "occupancy": (tokens - len(prompts)) / max(row_steps, 1),
            "refills": 0, "compile_seconds": dec.compile_seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", default="8,16,32", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=192, help="greedy continuation per prompt (the recipe's)")
    ap.add_argument("--prompts-per-row", type=int, default=3, help="prompts decoded per batch row")
    ap.add_argument("--ways", default=",".join(WAYS), help=f"of {', '.join(WAYS)}")
    ap.add_argument("--no-fixed", action="store_true", help="skip the fixed-batch reference")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    batches = [int(b) for b in args.batches.split(",")]
    ways = args.ways.split(",")
    for w in ways:
        if w not in WAYS:
            ap.error(f"--ways: unknown {w!r}; choose from {', '.join(WAYS)}")
    backbone = loading.load_backbone(args.model, dtype=args.dtype)
    rows = []
    t0 = time.time()
    for b in batches:
        prompts = chat_prompts(backbone.tokenizer, b * args.prompts_per_row, offset=0)
        runs = [run_stream(backbone, prompts, b, args.new_tokens, w) for w in ways]
        if not args.no_fixed:
            runs.append(run_fixed(backbone, prompts, b, args.new_tokens))
        base = next((r for r in runs if r["way"] == "plain" and r["batching"] == "continuous"), runs[0])
        for r in runs:
            r["cost_vs_plain"] = base["targets_per_s"] / r["targets_per_s"]
            rows.append(r)
            print(f"batch {r['batch']:3d}  {r['batching']:10s}  {r['way']:12s}  {r['targets_per_s']:6.1f} targets/s"
                  f"  occupancy {r['occupancy']:.2f}  cost x{r['cost_vs_plain']:.2f}  ({r['tokens']} tokens in "
                  f"{r['seconds']:.1f} s, {r['refills']} refills, compile {r['compile_seconds']:.0f} s)", flush=True)
    info = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "backend": jax.default_backend(),
            "model": args.model, "dtype": args.dtype, "new_tokens": args.new_tokens,
            "prompts_per_row": args.prompts_per_row, "wall_seconds": round(time.time() - t0, 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    best = max((r for r in rows if r["way"] == "hidden+top8"), key=lambda r: r["targets_per_s"], default=None)
    if best:
        print(f"best recording batch: {best['batch']} at {best['targets_per_s']:.1f} targets/s "
              f"(x{best['cost_vs_plain']:.2f} the plain decode)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
