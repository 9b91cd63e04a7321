"""Several heads checkpoints on the same held-out records of one feature store, side by side.

  python tools/eval_heads.py --config configs/draft_layer_store.toml \
      --heads clp_jax/shipped/demo_heads --heads runs/draft_layer_store/heads

Reads the config's store (its complete shards; nothing is built), takes the held-out split (a fixed function
of each record's id, as train.py takes it) and prints, per heads and per kind, the teacher-forced agreement of
every draft position with the backbone's greedy token: the figure train.py writes to eval.json, but for heads
trained on other data (a drafter before and after more data, on records neither saw). Each heads drafts from
its own vocabulary. Writes --out (JSON) when given.
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
    ap.add_argument("--config", required=True)
    ap.add_argument("--heads", action="append", required=True, help="a heads checkpoint (repeatable)")
    ap.add_argument("--records", type=int, default=64, help="held-out records per kind (at most)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    backbone = load_backbone(cfg.model.name, dtype=cfg.model.dtype)
    inputs = data_lib.build_inputs(cfg.data, backbone.tokenizer, backbone.source, cache_dir("datasets"))
    plan = data_lib.build_store(cfg.data, inputs, cfg.run.store_dir, backbone=backbone.model, make_generator=None,
                                feature_batch_size=1, progress=False, missing="skip")
    store = fs.FeatureStore(cfg.run.store_dir, plan)
    by_kind = heldout_by_kind(store, split_indices(store, cfg.data)["heldout"], args.records)
    results = {}
    for path in args.heads:
        heads = checkpoint.load_heads(path, backbone.cfg)
        vocab = (np.asarray(heads.draft_vocab[...]) if heads.draft_vocab is not None
                 else np.arange(backbone.cfg.vocab_size, dtype=np.int32))
        trainer = Trainer(backbone.model, heads, "drafter", cfg.train, vocab, 1)
        results[path] = {kind: evaluate(trainer, store, recs, args.batch_size) for kind, recs in by_kind.items()}
        print(f"{path}:")
        for kind, r in results[path].items():
            print(f"  {kind:10s} first draft {r['agreement'][0]:.4f}  per draft {r['agreement']}  "
                  f"({r['records']} records, {r['positions']} positions)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "records_per_kind": args.records, "heads": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
