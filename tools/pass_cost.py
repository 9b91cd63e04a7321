"""Per-pass cost of every fed width and every decoding mode, both matmul layouts side by side, on a
randomly initialised backbone of a given geometry (no download).

Random weights make acceptance meaningless, so modes are compared by milliseconds per backbone pass,
which is what the speed of every mode is built from. Both layouts read the same weights (stored once,
[out, in]); "rows" is the accelerator layout (X @ W^T on [B, T, D]), "cols" keeps activations
[D, B, T] through the stack (W @ X), the XLA:CPU default. Every measurement interleaves the variants
(A/B/A/B) and reports medians, so load on a shared machine hits both alike.

  python tools/pass_cost.py --geometry qwen2.5-0.5b --k 4
  python tools/pass_cost.py --table-only [--remeasure]   # the table verify's draft budget reads

The first thing printed is this machine's pass-cost table (clp_jax/decode/pass_costs.py: the one `verify`'s draft
budget and the decoder's cost statistics read), from the cache or measured now.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clp_jax.bench.roofline import read_bandwidth, roofline
from clp_jax.decode import pass_costs
from clp_jax.decode.budget import PROBE_EVERY
from clp_jax.decode.decoder import DecodeConfig, Decoder
from clp_jax.drafting.heads import Heads, HeadsConfig
from clp_jax.model.config import known_geometry
from clp_jax.model.kv_cache import init_cache
from clp_jax.model.qwen2 import Qwen2, abstract_model, padded_width, resolve_layout

GEOMETRIES = {"qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
              "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct"}
LAYOUTS = ("rows", "cols")
MODES = ("ar", "clp", "verify", "confadapt")


def qwen2_layout(model: Qwen2) -> str:
    """The layout this backend decodes with by default."""
    return resolve_layout(model.cfg.replace(matmul_layout="auto"))


def with_layout(model: Qwen2, layout: str) -> Qwen2:
    """The same weights (no copy) under another ModelConfig.matmul_layout."""
    graphdef, _ = nnx.split(abstract_model(model.cfg.replace(matmul_layout=layout)))
    return nnx.merge(graphdef, nnx.state(model))


def pass_fn(model: Qwen2):
    """A jitted backbone pass: trunk over the fed tokens, output projection of every fed row, argmax."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, positions, cache):
        m = nnx.merge(graphdef, state)
        hidden, cache = m(tokens, positions, cache)
        return jnp.argmax(m.logits(hidden), axis=-1), cache

    return lambda *a: run(state, *a)


def fed_width_table(models: dict, widths, batch: int, repeats: int, context: int = 64):
    """Median ms of one pass per (layout, width), interleaved over `repeats` rounds."""
    cfg = next(iter(models.values())).cfg
    cache = init_cache(cfg, batch, 256)
    fns = {}
    for layout, m in models.items():
        f = pass_fn(m)
        for w in widths:
            tokens = jnp.full((batch, w), 7, jnp.int32)
            positions = jnp.broadcast_to(context + jnp.arange(w, dtype=jnp.int32), (batch, w))
            args = (tokens, positions, cache)
            jax.block_until_ready(f(*args))
            fns[layout, w] = (f, args)
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, (f, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[key].append(time.perf_counter() - t0)
    return ({key: 1e3 * float(np.median(t)) for key, t in times.items()},
            {key: 1e3 * float(np.min(t)) for key, t in times.items()})


def mode_table(models: dict, heads, k: int, new: int, batch: int, repeats: int, modes):
    """Median ms per backbone pass per (layout, mode) through the real decoder, interleaved."""
    prompts = [list(range(100, 140))] * batch
    decs = {}
    compile_s = {}
    for layout, m in models.items():
        for mode in modes:
            name, _, kk = mode.partition("@")  # "verify@3": that mode at another k
            # every pass feeds all k drafts (random heads: the budget would feed none)
            dec = Decoder(m, None if name == "ar" else heads,
                          DecodeConfig(mode=name, k=int(kk or k), max_new_tokens=new, tau=1.0, draft_budget="fixed",
                                       draft_source="heads"))
            dec.generate(prompts)  # compile and warm up
            decs[layout, mode] = dec
            compile_s[layout, mode] = dec.compile_seconds
    times = {key: [] for key in decs}
    for _ in range(repeats):
        for key, dec in decs.items():
            res = dec.generate(prompts)
            times[key].append(res.decode_seconds / max(int(res.passes.max()) - 1, 1))
    return {key: 1e3 * float(np.median(t)) for key, t in times.items()}, compile_s


def draft_cost(model: Qwen2, heads, k: int, repeats: int) -> float:
    """Median ms of one drafting step alone (the heads' `draft` after a pass over k+1 fed slots, B=1):
    for the draft layer its cached pass over the chunk plus k-1 chained steps and k projections."""
    W = k + 1
    kernel = heads.draft_kernel(model)
    cache = heads.init_cache(1, 256, model.cfg.jnp_dtype)
    hidden = jax.random.normal(jax.random.key(0), (1, W, model.cfg.hidden_size), model.cfg.jnp_dtype)
    tokens = jnp.arange(W, dtype=jnp.int32)[None] + 100
    positions = tokens - 100 + 40
    anchor = jnp.zeros((1,), jnp.int32)

    @jax.jit
    def run(hidden, cache):
        pick = lambda j, logits: jnp.argmax(logits, -1).astype(jnp.int32)  # noqa: E731
        d = heads.draft(model, hidden, tokens, positions, anchor, k, cache, pick, kernel)
        return d.tokens, d.cache

    jax.block_until_ready(run(hidden, cache))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(hidden, cache))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def real_table(args) -> None:
    """The pass-cost table decode.py and the bench read for a real backbone and its heads."""
    from clp_jax.cli import options
    from clp_jax.weights import loading

    backbone = loading.load_backbone(args.model, dtype=args.dtype)
    heads = options.build_heads(options.heads_source(args.heads, args.model, "verify"), backbone.cfg)
    dec = Decoder(backbone.model, heads, DecodeConfig(mode="verify", k=min(args.k, heads.cfg.k)),
                  remeasure_costs=args.remeasure)
    table = dec.costs(args.batch, args.cache_len)
    key = pass_costs.table_key(backbone.model, args.batch, args.cache_len)
    print(f"device {key['device']}, {backbone.source} ({key['layout']}, {key['dtype']}), heads "
          f"{pass_costs.drafter_signature(dec._heads)}, batch {args.batch}, k {dec.dc.k}; "
          f"{pass_costs.table_path(key)}\n{table.format()}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="qwen2.5-0.5b", choices=sorted(GEOMETRIES))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--new", type=int, default=32, help="tokens per generate() in the mode table")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cache-len", type=int, default=512,
                   help="the cache length the table is timed at (decoding's: prompt + new tokens + a chunk)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds of the fed-width table")
    p.add_argument("--mode-repeats", type=int, default=3, help="interleaved generate() rounds per mode")
    p.add_argument("--modes", default=",".join(MODES) + ",verify@3",
                   help="comma-separated, mode@k for another k; empty: skip the mode table")
    p.add_argument("--extra-widths", default="8", help="fed widths beyond k+1 to time, comma-separated")
    p.add_argument("--draft-vocab", type=int, default=0, help="heads draft from this many ids (0: all)")
    p.add_argument("--no-roofline", action="store_true")
    p.add_argument("--heads-kind", default="medusa", choices=("medusa", "draft_layer"),
                   help="drafter of the mode table; the drafting cost of both kinds is printed either way")
    p.add_argument("--table-only", action="store_true", help="print the pass-cost table and stop")
    p.add_argument("--model", default=None,
                   help="print the table of this backbone ('demo', a .gguf, an HF directory) with its shipped or "
                        "--heads heads (what decode.py reads) and stop; default: a random model of --geometry")
    p.add_argument("--heads", default=None, help="with --model: a heads checkpoint (default: the shipped heads)")
    p.add_argument("--remeasure", action="store_true", help="measure the pass-cost table again (else cached)")
    args = p.parse_args()
    if args.model:
        return real_table(args)
    cfg = known_geometry(GEOMETRIES[args.geometry], dtype=args.dtype, param_dtype=args.dtype)
    base = Qwen2(cfg, rngs=nnx.Rngs(0))
    models = {layout: with_layout(base, layout) for layout in LAYOUTS}
    max_k = max([args.k] + [int(m.partition("@")[2]) for m in args.modes.split(",") if "@" in m])
    vocab = range(args.draft_vocab) if args.draft_vocab else None

    def make_heads(kind):
        return Heads(HeadsConfig.for_backbone(cfg, k=max_k, kind=kind, param_dtype=args.dtype), rngs=nnx.Rngs(0),
                     draft_vocab=vocab)

    heads = make_heads(args.heads_kind)
    print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), {args.geometry}, {args.dtype}, "
          f"batch {args.batch}, k {args.k}; medians of interleaved repeats (rows/cols alternate)")
    default = qwen2_layout(base)
    W = args.k + 1
    table = pass_costs.load_or_measure(models[default], heads, max_width=W, draft_widths=(1, W, PROBE_EVERY + W),
                                       batch=args.batch, remeasure=args.remeasure, cache_len=args.cache_len)
    key = pass_costs.table_key(models[default], args.batch, args.cache_len)
    print(f"\npass-cost table ({default} layout, {args.heads_kind} drafter, {key['cache']}-slot cache; "
          f"{pass_costs.table_path(key)}):\n{table.format()}")
    if args.table_only:
        return

    extra = [int(w) for w in args.extra_widths.split(",") if w]
    widths = list(range(1, args.k + 2)) + [w for w in extra if w > args.k + 1]
    ms, ms_min = fed_width_table(models, widths, args.batch, args.repeats)
    print(f"\nfed width: one pass = trunk over the fed tokens + output projection of each; median of "
          f"{args.repeats} interleaved rounds (min in brackets: on a loaded machine the min is the steadier figure)")
    print(f"{'width':>5} {'runs at':>7} | {'rows ms':>14} {'x ar':>5} | {'cols ms':>14} {'x ar':>5} {'x rows-ar':>9}")
    for w in widths:
        r, c, rm, cm = ms["rows", w], ms["cols", w], ms_min["rows", w], ms_min["cols", w]
        print(f"{w:5d} {padded_width(models['cols'].cfg, args.batch, w):7d} | {r:7.1f} [{rm:5.1f}] {r / ms['rows', 1]:5.2f} | "
              f"{c:7.1f} [{cm:5.1f}] {c / ms['cols', 1]:5.2f} {c / ms['rows', 1]:9.2f}")

    modes = [m for m in args.modes.split(",") if m]
    mode_ms = {}
    if modes:
        mode_ms, compile_s = mode_table(models, heads, args.k, args.new, args.batch, args.mode_repeats, modes)
        print(f"\nmodes through the decoder, ms per backbone pass (k={args.k}, {args.mode_repeats} rounds of "
              f"{args.new} new tokens; random heads, so drafts are fed but rarely accepted)")
        print(f"{'mode':>10} | {'rows ms':>8} {'x ar':>5} | {'cols ms':>8} {'x ar':>5} {'x rows-ar':>9} | compile s")
        ar_r, ar_c = mode_ms.get(("rows", "ar")), mode_ms.get(("cols", "ar"))
        for mode in modes:
            r, c = mode_ms["rows", mode], mode_ms["cols", mode]
            rr = f"{r / ar_r:5.2f}" if ar_r else "    -"
            cc = f"{c / ar_c:5.2f}" if ar_c else "    -"
            cr = f"{c / ar_r:9.2f}" if ar_r else "        -"
            print(f"{mode:>10} | {r:8.1f} {rr} | {c:8.1f} {cc} {cr} | "
                  f"{compile_s['rows', mode]:.0f} / {compile_s['cols', mode]:.0f}")

    print(f"\ndrafting alone, ms per step (B=1, k={args.k}, draft vocabulary {args.draft_vocab or 'full'}; "
          f"ratio to a width-1 pass of each layout)")
    for kind in ("medusa", "draft_layer"):
        h = make_heads(kind)
        for layout, m in models.items():
            d_ms = draft_cost(m, h, args.k, args.repeats)
            print(f"{kind:>12} {layout:>5}: {d_ms:6.1f} ms = {d_ms / ms[layout, 1]:.2f} x a width-1 pass")

    if not args.no_roofline:
        bw = read_bandwidth()
        print(f"\nread bandwidth {bw['bandwidth'] / 1e9:.1f} GB/s (median of {bw['repeats']}, p10-p90 "
              f"{bw['p10'] / 1e9:.1f}-{bw['p90'] / 1e9:.1f}, kernel {bw['kernel']}; medians "
              + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bw["medians"].items()) + ")")
        for layout in LAYOUTS:
            for label, sec in (("ar mode", mode_ms.get((layout, "ar"))), ("width-1 pass", ms[layout, 1])):
                if sec is None:
                    continue
                rf = roofline(models[layout], sec / 1e3, bw)
                lo, hi = rf["fraction_p10_p90"]
                print(f"{layout} {label:12s}: {sec:6.1f} ms vs roofline {rf['roofline_ms_per_pass']:.1f} ms "
                      f"({rf['weight_bytes_per_pass'] / 1e9:.2f} GB) = {rf['fraction_of_roofline']:.0%} "
                      f"of the roofline (bandwidth p90..p10: {lo:.0%}-{hi:.0%})")


if __name__ == "__main__":
    main()
