"""Train a drafter (the draft layer or Medusa heads), the CLP and, optionally, the gate baseline on a frozen
backbone: `python train.py --config configs/draft_layer_demo.toml`. One run builds the feature store
(self-distilled and teacher-forced records), trains, evaluates and writes heads that decode.py loads."""

from __future__ import annotations

import argparse
import json
import sys


from clp_jax.cli import options
from clp_jax.train import multihost, pipeline
from clp_jax.train.run_config import load_config
from clp_jax.weights import loading


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="TOML run config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.learning_rate=3e-4 (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    options.setup_logging()
    try:
        # Every value is checked before anything heavy starts (backbone load, dataset build, compilation).
        cfg = load_config(args.config, args.set)
        loading.check_source(cfg.model.name, flag="model.name")
        if cfg.mesh is not None and cfg.mesh.distributed:
            multihost.initialize()  # one process per pod host (see clp_jax/train/multihost.py)
        result = pipeline.run(cfg, progress=not args.no_progress)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    cal = result.get("calibration")
    if cal:  # the reliability tables stay in eval.json
        result = {**result, "calibration": {"temperature": cal["temperature"],
                                            "ece": [[d["ece_before"], d["ece_after"]] for d in cal["per_draft"]]}}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
