"""Held-out first-draft acceptance against the number of training targets: one `train.py` run per size.

  python tools/scaling_curve.py --config configs/draft_layer_demo.toml --targets 250000,500000,1000000,2000000
  python tools/scaling_curve.py --config configs/draft_layer_demo.toml --targets 100000 --compare-sources

Every run reads the config's one feature store (run.features_dir) and trains the drafter on a nested random
subset of its 'train' records (run.train_targets), with `--epochs` passes over that subset (steps scale
with the size), through the one training path; each is evaluated on the same held-out records. Runs are
resumable (each has its own run.out_dir under --out; a finished one is read, not run again). With
`--compare-sources`, each size is trained twice more at the same steps, once on self-distilled records
only and once on teacher-forced corpus records only, so the mix is chosen from a number. Writes
scaling.json and scaling.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from clp_jax.train.prompts import KINDS  # noqa: E402
from clp_jax.train.run_config import load_config  # noqa: E402

DISTILLED = [k for k in KINDS if k != "corpus"]
SOURCES = {"mix": (), "distilled": tuple(DISTILLED), "teacher_forced": ("corpus",)}


def run_one(args, cfg, n: int, source: str) -> dict:
    out = os.path.join(args.out, f"{source}_{n}")
    done = os.path.join(out, "eval.json")
    if not os.path.exists(done):
        rc = cfg.run
        steps = max(args.min_steps, int(round(args.epochs * n / (rc.batch_size * rc.window))))
        sets = [f'run.out_dir="{out}"', f'run.features_dir="{rc.store_dir}"', f"run.train_targets={n}",
                f"run.steps={args.steps or steps}", 'run.stop_after="drafter"']
        if SOURCES[source]:
            sets.append("run.train_kinds=[" + ",".join(f'"{k}"' for k in SOURCES[source]) + "]")
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", args.config]
        for s in sets + args.set:
            cmd += ["--set", s]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    with open(done) as f:
        ev = json.load(f)
    first = {kind: float(v["agreement"][0]) for kind, v in ev["drafter"].items()}
    distilled = [first[k] for k in first if k != "corpus"]
    return {"targets_asked": n, "source": source, "train_positions": ev["train_positions"],
            "train_positions_by_kind": ev.get("train_positions_by_kind", {}), "steps": ev["drafter_steps"],
            "first_draft": first, "first_draft_distilled": float(np.mean(distilled)) if distilled else None}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    mix = sorted((r for r in rows if r["source"] == "mix"), key=lambda r: r["train_positions"])
    kinds = sorted({k for r in mix for k in r["first_draft"]})
    for kind in kinds:
        ax.plot([r["train_positions"] for r in mix], [r["first_draft"][kind] for r in mix], "o-", label=kind)
    for source, marker in (("distilled", "s"), ("teacher_forced", "^")):
        pts = sorted((r for r in rows if r["source"] == source), key=lambda r: r["train_positions"])
        if pts:
            ax.plot([r["train_positions"] for r in pts], [r["first_draft_distilled"] for r in pts], marker + "--",
                    label=f"{source} only (mean of generated kinds)")
    ax.set_xscale("log")
    ax.set_xlabel("training targets")
    ax.set_ylabel("held-out first-draft acceptance")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--targets", required=True, help="comma-separated training-target counts")
    ap.add_argument("--epochs", type=float, default=2.0, help="passes over each subset (steps scale with size)")
    ap.add_argument("--steps", type=int, default=0, help="the same steps at every size instead of --epochs")
    ap.add_argument("--min-steps", type=int, default=50)
    ap.add_argument("--compare-sources", action="store_true",
                    help="also train on self-distilled only and on teacher-forced only, same steps")
    ap.add_argument("--out", default="runs/scaling")
    ap.add_argument("--set", action="append", default=[], help="more train.py overrides (repeatable)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)  # the overrides size the steps too (run.batch_size, run.window)
    sizes = [int(float(x)) for x in args.targets.split(",")]
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for n in sizes:
        for source in ("mix", "distilled", "teacher_forced") if args.compare_sources else ("mix",):
            rows.append(run_one(args, cfg, n, source))
            r = rows[-1]
            print(f"{source:15s} {r['train_positions']:9d} targets, {r['steps']} steps: first draft "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["first_draft"].items()), flush=True)
    with open(os.path.join(args.out, "scaling.json"), "w") as f:
        json.dump({"config": args.config, "epochs": args.epochs, "rows": rows}, f, indent=1)
    plot(rows, os.path.join(args.out, "scaling.png"))
    print(f"wrote {os.path.join(args.out, 'scaling.json')} and scaling.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
