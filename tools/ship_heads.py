"""Ships trained heads with the package: `python tools/ship_heads.py runs/draft_layer_demo/heads`.

Copies the checkpoint to clp_jax/shipped/<model>_heads with bf16 parameters (half the size; decoding
computes in the backbone's dtype), where `decode.py` and the benchmark find them by default. The model
name, the drafter kind, k, the gate, the draft vocabulary and the calibration all come from the run
(heads.json); `--model` only overrides the name for heads trained before train.py recorded it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from clp_jax.drafting import checkpoint
from clp_jax.drafting.heads import param_summary


def _run_model(heads: str) -> str | None:
    """The --model value recorded by train.py in the checkpoint's heads.json (None if absent); a missing or
    unreadable heads.json raises CheckpointError naming it."""
    return checkpoint.read_meta(os.path.abspath(os.path.expanduser(heads))).get("model")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("heads", help="heads checkpoint written by train.py (runs/<name>/heads)")
    p.add_argument("--model", default="", help="the --model value these heads belong to (default: the run's)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = p.parse_args(argv)
    try:
        model = args.model or _run_model(args.heads)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not model:
        print(f"error: {args.heads}/heads.json does not name its model; pass --model NAME.", file=sys.stderr)
        return 2
    dst = os.path.join(checkpoint.SHIPPED_DIR, f"{model}_heads")
    tmp = dst + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        heads = checkpoint.export_heads(args.heads, tmp, args.dtype)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs)
    print(f"shipped {dst}: {param_summary(heads)}; {size / 1e6:.1f} MB on disk")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
