"""Figures of the evaluation report (paper Figs. 8-9, 11, 13-16). Every function draws on the
``ax`` (or ``axes``) it is given, creating a figure only when it is not, and returns what it drew
on. Figures are built with ``matplotlib.figure.Figure`` (the Agg canvas), never through pyplot:
no window ever opens and nothing global changes."""

from __future__ import annotations

import numpy as np

from astromer_fast.evaluation.metrics import row_normalise


def new_figure(width: float = 6.0, height: float = 4.5):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _ax(ax, width=6.0, height=4.5):
    return ax if ax is not None else new_figure(width, height).add_subplot()


def class_colors(classes) -> dict:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    return {c: cmap(i % cmap.N) for i, c in enumerate(classes)}


def save(fig, path, dpi: int = 110):
    """PNG to ``path``; returns it."""
    fig.savefig(path, dpi=dpi, format="png")
    return path


def plot_confusion(cm, classes, ax=None, title: str = "", normalize: bool = True):
    """Confusion matrix (rows: true class), row-normalised by default, with the counts."""
    ax = _ax(ax, 4.5, 4.0)
    cm = np.asarray(cm)
    shown = row_normalise(cm) if normalize else cm
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    n = len(classes)
    for i in range(n):
        for j in range(n):
            v = shown[i, j]
            txt = f"{v:.2f}" if normalize else f"{int(v)}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                    color="white" if (v > 0.5 if normalize else v > shown.max() / 2) else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax, shrink=0.8)
    return ax


def plot_gamma(weights_by_spc: dict, ax=None, title: str = ""):
    """Learned softmax(γ) per layer (γ0 = input embedding, γ1.. = blocks), one marker per SPC,
    mean ± std over folds (paper Fig. 13). ``weights_by_spc``: ``{spc: array (folds, K)}``.
    Points, not bars: the weights often stay close to 1/K, and the axis is zoomed onto them."""
    ax = _ax(ax, 6.5, 3.8)
    spcs = list(weights_by_spc)
    k = np.asarray(next(iter(weights_by_spc.values()))).shape[-1]
    step = 0.6 / max(len(spcs), 1)
    for j, spc in enumerate(spcs):
        w = np.atleast_2d(np.asarray(weights_by_spc[spc], dtype=float))
        x = np.arange(k) + (j - (len(spcs) - 1) / 2) * step
        ax.errorbar(x, w.mean(0), yerr=w.std(0) if len(w) > 1 else None, fmt="o", ms=5,
                    capsize=3, label=f"{spc} SPC")
    ax.axhline(1.0 / k, color="gray", lw=0.8, ls="--", label=f"initial 1/{k}")
    ax.set_xticks(range(k), ["input" if i == 0 else f"block {i}" for i in range(k)],
                  fontsize=8)
    ax.set_ylabel("softmax(γ)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def tsne_2d(x, seed: int = 0, perplexity: float = 30.0, learning_rate: float = 1000.0):
    """t-SNE of (N, D) with the paper's settings (perplexity 30, learning rate 1000); the
    perplexity is lowered for small N (it must stay below N)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, dtype=np.float64)
    perp = float(min(perplexity, max(2.0, (len(x) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perp, learning_rate=learning_rate, init="pca",
                random_state=seed)
    # One OpenMP thread: the Barnes-Hut gradient of a few hundred points is tiny per iteration,
    # and with a thread team on a shared machine it ran 15x slower (measured on 2 busy cores).
    with threadpool_limits(limits=1):
        return tsne.fit_transform(x)


def plot_scatter_classes(xy, labels, classes, ax=None, title: str = "", legend: bool = True):
    ax = _ax(ax, 4.0, 4.0)
    colors = class_colors(classes)
    labels = np.asarray(labels)
    for c in classes:
        sel = labels == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=colors[c], label=f"{c} ({int(sel.sum())})",
                   alpha=0.8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    return ax


def plot_tsne_blocks(layers, labels, classes, axes=None, seed: int = 0):
    """One t-SNE panel per layer of (N, K, D) stacks, coloured by class (paper Figs. 14-15).
    Returns the axes."""
    layers = np.asarray(layers)
    k = layers.shape[1]
    if axes is None:
        cols = min(k, 4)
        rows = -(-k // cols)
        fig = new_figure(3.2 * cols, 3.2 * rows)
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for a in axes[k:]:
            a.set_visible(False)
    for i in range(k):
        xy = tsne_2d(layers[:, i], seed=seed)
        plot_scatter_classes(xy, labels, classes, ax=axes[i],
                             title="input embedding" if i == 0 else f"block {i}",
                             legend=(i == 0))
    return axes


def received_attention(weights, valid) -> np.ndarray:
    """(H, L, L) softmax weights of one window -> (H, n_valid): the mean attention each valid
    observation receives as a key, over the valid queries."""
    w = np.asarray(weights, dtype=np.float64)
    v = np.asarray(valid, dtype=bool)
    return w[:, v][:, :, v].mean(axis=1)


def plot_attention_folded(phase, mag, attention, ax=None, title: str = "", cmap="viridis"):
    """A folded light curve (two cycles), each point coloured by the attention it receives,
    normalised to [0, 1] within the panel (paper Figs. 8-9). Magnitudes grow downwards."""
    ax = _ax(ax, 4.0, 3.0)
    a = np.asarray(attention, dtype=float)
    span = a.max() - a.min()
    a = (a - a.min()) / span if span > 0 else np.zeros_like(a)
    ph = np.concatenate([phase, phase + 1])
    order = np.argsort(np.concatenate([a, a]))  # strongest on top
    sc = ax.scatter(ph[order], np.concatenate([mag, mag])[order],
                    c=np.concatenate([a, a])[order], cmap=cmap, vmin=0, vmax=1, s=10,
                    linewidths=0)
    if not ax.yaxis_inverted():
        ax.invert_yaxis()
    ax.set_xlim(0, 2)
    ax.set_xlabel("phase", fontsize=8)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    ax.sc = sc  # for a colorbar by the caller
    return ax


def plot_learning_curves(histories: dict, ax=None, title: str = "",
                         keys=("train_loss", "val_loss")):
    """Finetuning curves: ``{label: history rows}``; solid = first key, dashed = second."""
    ax = _ax(ax, 6.0, 3.8)
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    for i, (label, rows) in enumerate(histories.items()):
        color = cmap(i % 10)
        for key, ls in zip(keys, ("-", "--")):
            pts = [(r["step"], r[key]) for r in rows
                   if key in r and r[key] is not None and np.isfinite(r[key]) and "step" in r]
            if pts:
                s, v = zip(*pts)
                ax.plot(s, v, ls, color=color, marker="." if len(pts) < 30 else None,
                        label=f"{label} {key}")
    ax.set_xlabel("finetuning step")
    ax.set_ylabel("masked reconstruction loss")
    ax.legend(fontsize=6, ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_f1_vs_spc(summary: dict, ax=None, title: str = ""):
    """Macro F1 (mean ± std over folds) against SPC, one line per method (cf. paper Fig. 11).
    ``summary``: ``{method: {spc: (mean, std)}}``."""
    ax = _ax(ax, 6.0, 4.0)
    for method, by_spc in summary.items():
        spcs = sorted(by_spc)
        m = [by_spc[s][0] for s in spcs]
        sd = [by_spc[s][1] for s in spcs]
        ax.errorbar(spcs, m, yerr=sd, marker="o", capsize=3, label=method)
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    spcs = sorted({s for v in summary.values() for s in v})
    ax.set_xticks(spcs, [str(s) for s in spcs])
    ax.xaxis.set_minor_locator(NullLocator())  # log-scale minor labels ("6×10⁰") are noise
    ax.set_xlabel("samples per class")
    ax.set_ylabel("macro F1 (test)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return ax
