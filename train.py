"""Train MTP heads, the CLP and the gate baseline on a frozen backbone: `python train.py --config configs/demo.toml`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="TOML run config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.learning_rate=3e-4 (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from clp_jax.train import loop as train_loop
    from clp_jax.train import multihost

    try:
        cfg = train_loop.load_config(args.config, args.set)
        if cfg.get("mesh", {}).get("distributed"):
            cfg["mesh"].pop("distributed")
            multihost.initialize()  # one process per pod host (see clp_jax/train/multihost.py)
        result = train_loop.run(cfg, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
