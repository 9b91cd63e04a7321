"""Where one step of the decoding loop goes, op by op: the loop's compiled program run under the JAX profiler,
its ops' times summed per kind (dots by output shape, copies, scatters, ...), per loop step.

It found what made self-distillation slow on XLA:CPU: with the KV cache stored [B, S, K, H], every layer's cache
was copied into the layout of attention's dots before them (85 of 477 ms per step at batch 32, 448 slots).

  python tools/profile_step.py --batch 32 --cache-len 448 --record     # a step of the data job (the default)
  python tools/profile_step.py --batch 1 --cache-len 448 --no-record   # a plain `ar` step
  python tools/profile_step.py --batch 1 --mode verify --k 3           # verify with the shipped heads

Op names are XLA's (`ynn_fusion`: a dot fused with what surrounds it, run by YNNPACK on CPU); a fusion's output
shape tells which dot it is (for the 0.5B demo backbone in the cols layout at batch 32: [4864, 32] the MLP's
gate and up projections, [896, 32] its down projection and q/o, [151936, 32] the output projection, [32, 2, 7,
448] attention's scores). Timings share the machine with whatever else runs: read them side by side, in one run.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax

from clp_jax.decode.decoder import Decoder
from clp_jax.decode.state import DecodeConfig
from clp_jax.drafting.checkpoint import load_heads, shipped_heads_path
from clp_jax.weights.loading import load_backbone

WRAPPERS = ("ThunkExecutor", "$", "SlinkyThreadPool", "while", "PjitFunction", "end: ", "ParseArguments",
            "CommonPjRt", "Handle inputs")


def op_times(trace_dir: str) -> collections.Counter:
    """Microseconds per op name in the perfetto trace the profiler wrote under `trace_dir`."""
    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    out = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and "dur" in e and not name.startswith(WRAPPERS):
            out[name] += e["dur"]
    return out


def output_shapes(hlo: str) -> dict[str, str]:
    """Each instruction's output shape in the optimized HLO text, by name."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.-]+) = (\S+) ", hlo, re.M)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cache-len", type=int, default=448, help="the loop's static cache (the data job: 448)")
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--steps", type=int, default=4, help="loop steps profiled (after one compiled warm-up step)")
    ap.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                    help="ar: record hidden states and the top-8, as self-distillation does")
    ap.add_argument("--mode", choices=("ar", "verify"), default="ar")
    ap.add_argument("--k", type=int, default=3, help="verify: the drafts")
    ap.add_argument("--draft-budget", default="auto", help="verify: auto (the default: a width switch per pass) "
                                                           "or fixed (all k fed every pass, one width)")
    ap.add_argument("--heads", default=None, help="verify: a heads checkpoint (default: the shipped heads)")
    ap.add_argument("--top", type=int, default=12, help="op kinds printed")
    args = ap.parse_args(argv)

    bb = load_backbone(args.model, progress=False)
    heads = None
    if args.mode == "verify":
        path = args.heads or shipped_heads_path(args.model)
        if path is None:
            raise SystemExit(f"No shipped heads for {args.model!r}: pass --heads PATH.")
        heads = load_heads(path, bb.cfg)
        dc = DecodeConfig(mode="verify", k=args.k, max_new_tokens=args.cache_len // 2, draft_budget=args.draft_budget,
                          draft_source="heads")
    else:
        dc = DecodeConfig(mode="ar", max_new_tokens=args.cache_len // 2, record_hidden=args.record,
                          record_topk=8 if args.record else 0)
    dec = Decoder(bb.model, heads, dc, bb.eos_token_ids)
    st = dec.start([[1] * args.prompt_len] * args.batch, capacity=args.cache_len)
    st = dec.advance(st, 1)
    jax.block_until_ready(st.length)
    (compiled,) = dec.programs("run")
    shapes = output_shapes(compiled.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            st = dec.advance(st, args.steps)
            jax.block_until_ready(st.length)
        times = op_times(trace_dir)

    kinds = collections.Counter()
    for name, us in times.items():
        kind = re.sub(r"\.\d+$", "", name)
        if kind == "ynn_fusion" or "copy" in kind:  # dots and copies: by what they produce
            kind = f"{kind} -> {shapes.get(name, '?').split('{')[0]}"
        kinds[kind] += us
    total = sum(kinds.values()) / args.steps / 1e3
    what = (f"verify, k={args.k}, {args.draft_budget} budget" if args.mode == "verify"
            else "ar, recording hidden + top-8" if args.record else "ar, no recording")
    print(f"{args.model}: batch {args.batch}, cache {args.cache_len} slots, {what}, on {jax.default_backend()}: "
          f"{total:.1f} ms per step in ops ({args.steps} steps)")
    for kind, us in kinds.most_common(args.top):
        ms = us / args.steps / 1e3
        print(f"  {ms:8.2f} ms  {100 * ms / total:5.1f}%  {kind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
