"""Per-pass cost of each decoding mode on a randomly initialised backbone of a given geometry.

Random weights make acceptance meaningless, so modes are compared by milliseconds per backbone pass
(drafts are forced off or on), which is what the speed of every mode is built from. Useful on
machines without the demo backbone (e.g. an accelerator host with no network).

  python tools/pass_cost.py --geometry qwen2.5-0.5b --new 64
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx

from clp_jax.model.config import known_geometry
from clp_jax.decode.loop import DecodeConfig, Decoder
from clp_jax.drafting.heads import Heads, HeadsConfig
from clp_jax.model.qwen2 import Qwen2

GEOMETRIES = {"qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
              "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="qwen2.5-0.5b", choices=sorted(GEOMETRIES))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--draft-vocab", type=int, default=0, help="heads draft from this many ids (0: all)")
    args = p.parse_args()
    cfg = known_geometry(GEOMETRIES[args.geometry], dtype=args.dtype, param_dtype=args.dtype)
    model = Qwen2(cfg, rngs=nnx.Rngs(0))
    heads = Heads(HeadsConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, k=args.k,
                              param_dtype=args.dtype), rngs=nnx.Rngs(0),
                  draft_vocab=range(args.draft_vocab) if args.draft_vocab else None)
    prompts = [list(range(100, 140))] * args.batch
    print(f"device {jax.devices()[0].device_kind}, {args.geometry}, {args.dtype}, batch {args.batch}, k {args.k}")
    base = None
    for mode in ("ar", "clp", "verify", "confadapt"):
        dec = Decoder(model, None if mode == "ar" else heads,
                      DecodeConfig(mode=mode, k=args.k, max_new_tokens=args.new, tau=1.0))
        dec.generate(prompts)  # compile and warm up
        res = dec.generate(prompts)
        ms = 1e3 * res.decode_seconds / max(int(res.passes.max()) - 1, 1)
        base = base or ms
        print(f"{mode:10s} {ms:8.2f} ms/pass  ({ms / base:.2f}x ar's pass)  compile {dec.compile_seconds:.1f} s")


if __name__ == "__main__":
    main()
