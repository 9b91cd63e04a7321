"""Exports a backbone and its draft layer for serving engines (vLLM's MiMo-MTP layout):
`python tools/export_vllm.py --model demo --out runs/demo-mimo` (default heads: the shipped ones).

The directory is a Hugging Face model directory that vLLM serves with
`speculative_config={"method": "mtp", "num_speculative_tokens": 1}` and that
`decode.py --model DIR --heads DIR` reads back. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from clp_jax.drafting import checkpoint
from clp_jax.weights import loading, mimo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="demo", help="'demo', a .gguf file, a Hugging Face directory or hub id")
    p.add_argument("--heads", default=None,
                   help="draft-layer heads checkpoint (default: the shipped heads of --model)")
    p.add_argument("--out", required=True, help="the directory to write (replaced if it exists)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="stored dtype (default: the backbone's, float32)")
    args = p.parse_args(argv)
    heads_path = args.heads or checkpoint.shipped_heads_path(args.model)
    try:
        if heads_path is None:
            raise checkpoint.CheckpointError(f"No heads are shipped for --model {args.model!r}: "
                                             "pass --heads PATH.")
        loading.check_source(args.model)
        mimo.check_kind(checkpoint.read_heads_config(heads_path).kind)  # cheap: before the backbone loads
        backbone = loading.load_backbone(args.model)
        heads = checkpoint.load_heads(heads_path, backbone.cfg)
        tmp = args.out.rstrip("/") + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        notes = mimo.export(tmp, backbone, heads, dtype=args.dtype, source=os.path.abspath(heads_path))
        shutil.rmtree(args.out, ignore_errors=True)
        os.replace(tmp, args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out} ({size / 1e6:.0f} MB): serve with vLLM, "
          'speculative_config={"method": "mtp", "num_speculative_tokens": 1}')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
