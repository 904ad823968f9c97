"""What a training run leaves for people: ``metrics.csv`` and the learning-curve plot."""

from __future__ import annotations

import csv

import numpy as np


def write_metrics_csv(rows: list, path):
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)


def plot_learning_curve(rows: list, path=None, ax=None):
    """Training and validation loss against step, validation R² on a second axis. Returns the
    axes; writes ``path`` (PNG) when given. Needs matplotlib (the ``plot`` extra)."""
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r.get("train_loss", np.nan) for r in rows], label="train loss")
    ax.plot(steps, [r.get("val_loss", np.nan) for r in rows], label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted RMSE (mag)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r.get("val_r2", np.nan) for r in rows], color="tab:green", ls="--",
             label="validation R² (probed)")
    ax2.set_ylabel("R²")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=8)
    if fig is not None:
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        plt.close(fig)
    return ax
