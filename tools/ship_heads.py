"""Ships trained heads with the package: `python tools/ship_heads.py runs/demo/heads --model demo`.

Copies the checkpoint to clp_jax/shipped/<model>_heads with bf16 parameters (half the size; decoding
computes in the backbone's dtype), where `decode.py` and the benchmark find them by default.
"""

from __future__ import annotations

import argparse
import os
import shutil

from clp_jax.drafting import checkpoint
from clp_jax.drafting.heads import param_summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("heads", help="heads checkpoint written by train.py (runs/<name>/heads)")
    p.add_argument("--model", default="demo", help="the --model value these heads belong to")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = p.parse_args(argv)
    dst = os.path.join(checkpoint.SHIPPED_DIR, f"{args.model}_heads")
    tmp = dst + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    heads = checkpoint.export_heads(args.heads, tmp, args.dtype)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs)
    print(f"shipped {dst}: {param_summary(heads)}; {size / 1e6:.1f} MB on disk")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
