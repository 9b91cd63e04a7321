"""Training curves as a PNG (matplotlib is optional: without it the plot is skipped with a note)."""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)


def plot_curves(metrics_path: str, png_path: str, scores_path: str | None = None) -> bool:
    """Loss and per-head agreement against the step (and, from `scores_path` when it exists, the held-out
    scores of run.eval_every); returns whether a plot was written."""
    try:  # optional, heavy dependency: imported only here
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no training-curve plot.")
        return False
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return False
    scores = []
    if scores_path and os.path.exists(scores_path):
        with open(scores_path) as f:
            scores = sorted({r["step"]: r for r in map(json.loads, filter(str.strip, f))}.values(),
                            key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3 if scores else 2, figsize=(15 if scores else 10, 4))
    a, b = axes[0], axes[1]
    a.plot(steps, [r["loss"] for r in rows])
    a.set(xlabel="step", ylabel="loss", title="training loss")
    for j in range(len(rows[0].get("agreement", []))):
        b.plot(steps, [r["agreement"][j] for r in rows], label=f"draft {j + 1}")
    b.set(xlabel="step", ylabel="agreement", title="per-draft agreement with the backbone (train batches)")
    b.legend(fontsize=7)
    if scores:
        c = axes[2]
        for kind in scores[0]["agreement"]:
            c.plot([r["step"] for r in scores], [r["agreement"][kind][0] for r in scores], marker="o",
                   label=f"{kind}, draft 1")
        c.plot([r["step"] for r in scores], [r["score"] for r in scores], "k--", marker="s", label="score")
        c.set(xlabel="step", ylabel="agreement", title="held-out agreement (run.eval_every)")
        c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True
