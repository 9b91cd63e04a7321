"""Training curves as a PNG (matplotlib is optional: without it the plot is skipped with a note)."""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def plot_curves(metrics_path: str, png_path: str) -> bool:
    """Loss and per-head agreement against the step; returns whether a plot was written."""
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
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(steps, [r["loss"] for r in rows])
    a.set(xlabel="step", ylabel="loss", title="training loss")
    for j in range(len(rows[0].get("agreement", []))):
        b.plot(steps, [r["agreement"][j] for r in rows], label=f"draft {j + 1}")
    b.set(xlabel="step", ylabel="agreement", title="per-draft agreement with the backbone (train batches)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True
