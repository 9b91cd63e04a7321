"""Decode with a Qwen2.5 backbone and MTP heads: `python decode.py --mode verify --prompt "def f(n):"`."""

from __future__ import annotations

import argparse
import sys

from clp_jax.cli import options
from clp_jax.cli import report
from clp_jax.decode import prompts as prompts_lib
from clp_jax.decode.decoder import DecodeConfig, Decoder
from clp_jax.decode.sampling import SamplingConfig
from clp_jax.decode.state import DRAFT_BUDGETS, DRAFT_SOURCES, MODES
from clp_jax.weights import loading


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="demo", help="'demo', a .gguf file, a Hugging Face directory or hub id")
    p.add_argument("--heads", default=None,
                   help="heads checkpoint directory, or 'zero' for untrained zero-initialised heads "
                        "(default: the shipped heads of the demo backbone, where they exist)")
    p.add_argument("--mode", default="verify", choices=MODES)
    p.add_argument("--k", type=int, default=None, help="heads to use (default: all the heads provide, "
                   "less any whose slot would pad a pass to a costlier width: 3 of 4 on CPU)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="jsonl: strings, {'prompt': ...} or {'messages': [...]}")
    p.add_argument("--chat", action="store_true", help="chat with the chat template: one user turn per line "
                   "of stdin, typed or piped (EOF ends it; at a terminal an empty line too)")
    p.add_argument("--chat-template", action="store_true", help="wrap --prompt(s) in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-cache-len", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--tau", type=float, default=0.9, help="confadapt confidence threshold")
    p.add_argument("--clp-confidence", type=float, default=None,
                   help="clp: accept the most heads l with P(L* >= l) >= this under the CLP (default: argmax)")
    p.add_argument("--draft-budget", choices=DRAFT_BUDGETS, default=None,
                   help="verify: drafts fed per pass. auto (default): only while they pay for their measured "
                        "cost (a pass-cost table measured once per machine); fixed: all k; clp: the CLP's number")
    p.add_argument("--verify-drafts", choices=("all", "clp"), default=None, help=argparse.SUPPRESS)  # old name
    p.add_argument("--draft-source", choices=DRAFT_SOURCES, default="both",
                   help="verify: drafts from the heads, from the context (prompt lookup), or both (default: the "
                        "retrieved continuation where the text's last tokens occurred before, else the heads')")
    p.add_argument("--tree", type=int, default=0,
                   help="verify: up to this many siblings beside the chain (the drafter's runner-up at depths 1..N), "
                        "checked in the same pass; the budget picks how many per pass (default 0: a chain)")
    p.add_argument("--adaptive-width", action=argparse.BooleanOptionalAction, default=None,
                   help="feed only the slots a step needs (default: on with --draft-budget auto or clp)")
    p.add_argument("--remeasure-costs", action="store_true",
                   help="measure this machine's pass costs again (else read from the cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--compare", choices=("ar",), help="also decode with ar: speedup (median of --repeats runs, "
                   "interleaved) and exact match; without prompts, a code completion and a chat request")
    p.add_argument("--repeats", type=int, default=3, help="--compare: runs of each decoder, order alternating")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options.setup_logging()
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError) as e:  # bad input: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    # Everything a user gave is checked first: a wrong value fails in a second, not after the backbone load.
    options.check_decode_args(args)
    if args.draft_budget is None:
        args.draft_budget = {"all": "fixed", "clp": "clp", None: "auto"}[args.verify_drafts]
    sampling_cfg = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    default = not (args.prompt or args.prompts_file or args.chat)
    if default:  # one code completion, and with --compare a chat request too (each its own way)
        args.prompt = list(prompts_lib.DEFAULT_PROMPTS[:2 if args.compare else 1])
    raw = list(args.prompt or []) + (prompts_lib.read_prompts_file(args.prompts_file) if args.prompts_file else [])
    loading.check_source(args.model)
    heads_source = options.heads_source(args.heads, args.model, args.mode, args.k)
    backbone = loading.load_backbone(args.model, dtype=args.dtype)
    print(f"backbone {backbone.source} ({'cached' if backbone.from_cache else 'converted'} in "
          f"{backbone.load_seconds:.1f} s)", file=sys.stderr)
    heads = options.build_heads(heads_source, backbone.cfg, args.k)
    k = args.k or options.default_k(heads, backbone.cfg, args.batch_size)
    dc = DecodeConfig(mode=args.mode, k=k, max_new_tokens=args.max_new_tokens, sampling=sampling_cfg,
                      tau=args.tau, clp_confidence=args.clp_confidence, draft_budget=args.draft_budget,
                      draft_source=args.draft_source, max_cache_len=args.max_cache_len,
                      adaptive_width=args.adaptive_width, tree=args.tree)
    decoder = Decoder(backbone.model, heads, dc, backbone.eos_token_ids, remeasure_costs=args.remeasure_costs)
    tok = backbone.tokenizer

    if args.chat:
        return report.chat_loop(decoder, tok, seed=args.seed)

    encoded = [prompts_lib.encode(tok, p, args.chat_template or (default and i == 1)) for i, p in enumerate(raw)]
    decoder.check_prompts(encoded)
    batches = [encoded[i:i + args.batch_size] for i in range(0, len(encoded), args.batch_size)]

    if args.compare:
        ar = Decoder(backbone.model, None, dc.replace(mode="ar", tree=0), backbone.eos_token_ids)
        return report.compare(decoder, ar, batches, tok, seed=args.seed, repeats=args.repeats)
    stream = len(encoded) == 1
    results = []
    for batch in batches:
        if stream:
            results.append(report.stream_one(decoder, tok, batch[0], seed=args.seed))
        else:
            res = decoder.generate(batch, seed=args.seed)
            for p, t in zip(batch, res.tokens):
                print(f"--- prompt: {tok.decode(p)!r}\n{tok.decode(t)}")
            results.append(res)
    print(report.stats_line(dc.mode, results, decoder), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
