"""Several heads checkpoints on the same held-out records of one feature store, side by side.

  python tools/eval_heads.py --config configs/draft_layer_store.toml \
      --heads clp_jax/shipped/demo_heads --heads runs/draft_layer_store/heads

Reads the config's store (its complete shards; nothing is built), takes the held-out split (a fixed function
of each record's id, as train.py takes it) and prints, per heads and per kind, the teacher-forced agreement of
every draft position with the backbone's greedy token: the figure train.py writes to eval.json, but for heads
trained on other data (a drafter before and after more data, on records neither saw). Each heads drafts from
its own vocabulary. Writes --out (JSON) when given.

With --bench N, the bench's prompts instead (the first N HumanEval problems and its chat prompts, no store needed):
`ar`'s greedy output is decoded once, then every heads is scored at every generated position of it, as
`python -m clp_jax.bench` reports it (draft j right given drafts 1..j-1 right, and at a plain k-chain's anchors):
drafters compared on the bench's figure in minutes, without the bench's timed runs.

  python tools/eval_heads.py --bench 20 --heads clp_jax/shipped/demo_heads --heads runs/draft_layer_store/heads
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from clp_jax.drafting import checkpoint  # noqa: E402
from clp_jax.train import data as data_lib  # noqa: E402
from clp_jax.train import feature_store as fs  # noqa: E402
from clp_jax.train.loop import evaluate  # noqa: E402
from clp_jax.train.pipeline import heldout_by_kind, split_indices  # noqa: E402
from clp_jax.train.run_config import load_config  # noqa: E402
from clp_jax.train.step import Trainer  # noqa: E402
from clp_jax.weights.assets import cache_dir  # noqa: E402
from clp_jax.weights.loading import load_backbone  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="the store's train.py config (held-out records; not with --bench)")
    ap.add_argument("--heads", action="append", required=True, help="a heads checkpoint (repeatable)")
    ap.add_argument("--records", type=int, default=64, help="held-out records per kind (at most)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--bench", type=int, default=0, metavar="N",
                    help="score on the bench's prompts (N HumanEval problems and the chat set) instead")
    ap.add_argument("--k", type=int, default=3, help="drafts scored with --bench (the bench's k)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="`ar`'s output length with --bench")
    ap.add_argument("--model", default="demo", help="the backbone with --bench")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.bench:
        return on_bench_prompts(args)
    if not args.config:
        ap.error("--config is required (or --bench N)")
    cfg = load_config(args.config)
    backbone = load_backbone(cfg.model.name, dtype=cfg.model.dtype)
    inputs = data_lib.build_inputs(cfg.data, backbone.tokenizer, backbone.source, cache_dir("datasets"))
    plan = data_lib.build_store(cfg.data, inputs, cfg.run.store_dir, backbone=backbone.model, make_generator=None,
                                feature_batch_size=1, progress=False, missing="skip")
    store = fs.FeatureStore(cfg.run.store_dir, plan)
    by_kind = heldout_by_kind(store, split_indices(store, cfg.data)["heldout"], args.records)

    def score(heads):
        vocab = (np.asarray(heads.draft_vocab[...]) if heads.draft_vocab is not None
                 else np.arange(backbone.cfg.vocab_size, dtype=np.int32))
        trainer = Trainer(backbone.model, heads, "drafter", cfg.train, vocab, 1)
        return {kind: evaluate(trainer, store, recs, args.batch_size) for kind, recs in by_kind.items()}

    results = score_each(args.heads, backbone.cfg, score, lambda r: (
        f"first draft {r['agreement'][0]:.4f}  per draft {r['agreement']}  "
        f"({r['records']} records, {r['positions']} positions)"))
    write(args.out, {"config": args.config, "records_per_kind": args.records, "heads": results})
    return 0


def score_each(paths, backbone_cfg, score, describe) -> dict:
    """{path: score(heads) per kind or set}, printed a line per kind with `describe`."""
    results = {}
    for path in paths:
        results[path] = score(checkpoint.load_heads(path, backbone_cfg))
        print(f"{path}:")
        for name, r in results[path].items():
            print(f"  {name:10s} {describe(r)}")
    return results


def write(path: str, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)


def on_bench_prompts(args) -> int:
    from clp_jax.bench import drafts
    from clp_jax.bench.run import SETS, load_samples
    from clp_jax.decode import batching
    from clp_jax.decode.decoder import DecodeConfig, Decoder

    backbone = load_backbone(args.model)
    samples = load_samples(backbone.tokenizer, SETS, args.bench)
    dec = Decoder(backbone.model, None, DecodeConfig(mode="ar", max_new_tokens=args.max_new_tokens),
                  backbone.eos_token_ids)
    outputs = [None] * len(samples)
    for f in batching.stream(dec, [s.ids for s in samples], 8):  # greedy: the tokens of the bench's batch-1 `ar`
        outputs[f.index] = f.tokens
    results = score_each(args.heads, backbone.cfg, lambda heads: drafts.by_set(
        backbone.model, heads, [s.set for s in samples], [s.ids for s in samples], outputs, args.k, progress=True),
        lambda r: (f"first draft {r['every_position'][0]:.4f}  per draft {r['every_position']}  "
                   f"at a chain's anchors {r['chain_accepted'][0]:.4f}  ({r['positions']} positions)"))
    write(args.out, {"bench_prompts": args.bench, "k": args.k, "max_new_tokens": args.max_new_tokens,
                     "heads": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
