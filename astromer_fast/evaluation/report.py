"""The report folder: ``report.md`` (tables), ``results.json`` (every number), ``runs.csv`` (one
row per method × SPC × fold) and the PNG figures."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from astromer_fast.evaluation import plots


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text.replace("γ", "gamma")).strip("-").lower()


def _fmt(mean, std) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def _table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def macro_f1_table(result) -> list[str]:
    summ = result.summary()
    spcs = result.settings["spc"]
    rows = []
    best = {spc: max((summ[m][spc][0] for m in summ if spc in summ[m]), default=None)
            for spc in spcs}
    for m in result.methods:
        cells = []
        for spc in spcs:
            if m in summ and spc in summ[m]:
                mean, std = summ[m][spc]
                c = _fmt(mean, std)
                cells.append(f"**{c}**" if best[spc] is not None and mean == best[spc] else c)
            else:
                cells.append("–")
        rows.append([m, *cells])
    return _table(["method", *[f"{s} SPC" for s in spcs]], rows)


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------

def _stratified(labels, cap, seed):
    from astromer_fast.evaluation.protocol import cap_per_class

    labels = np.asarray(labels)
    if len(labels) <= cap:
        return np.arange(len(labels))
    per = max(1, cap // max(len(np.unique(labels)), 1))
    return cap_per_class(labels, per, seed)


def attention_figure(model, ds, samples, device, title=""):
    """One row per sample (a test sample of each class), one column per head of the first block
    and one for their mean: the sample's first-band curve, first window, folded at its
    Lomb-Scargle period, each point coloured by the attention it receives."""
    import torch

    from astromer_fast.data import make_windows
    from astromer_fast.evaluation.features import best_period, fold

    h = model.config.n_heads
    fig = plots.new_figure(2.6 * (h + 1), 2.2 * len(samples) + 0.4)
    axes = fig.subplots(len(samples), h + 1, squeeze=False)
    for r, (label, si) in enumerate(samples):
        ci = int(ds.rows[si, 0])
        t_all, m_all, _ = ds.curves.curve(ci)
        w = make_windows(ds.curves.take([ci]), window=model.config.window, mode="nonoverlap",
                         min_obs=1)
        valid = w.valid[:1]
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        with torch.no_grad():
            out = model.encode(as_t(w.t[:1]), as_t(w.m[:1]), ~as_t(valid),
                               return_attention=True)
        att = out.attention[0][0].float().cpu().numpy()            # (H, L, L), first block
        recv = plots.received_attention(att, valid[0])               # (H, n_valid)
        nv = int(valid[0].sum())
        t, m = t_all[:nv], m_all[:nv]
        period, _ = best_period(t_all, m_all)
        phase = fold(t, period) if np.isfinite(period) else (t - t.min()) / max(np.ptp(t), 1e-9)
        band = ds.keys[ci].split("|", 1)[1]
        for j in range(h + 1):
            a = recv[j] if j < h else recv.mean(0)
            name = f"head {j}" if j < h else "mean of heads"
            ax = plots.plot_attention_folded(phase, m, a, ax=axes[r, j],
                                             title=f"{label} ({band}) · {name}")
            if j == 0:
                ax.set_ylabel(f"mag, P = {period:.3g} d", fontsize=8)
    fig.colorbar(axes[0, -1].sc, ax=axes[:, -1], shrink=0.6, label="attention received (norm.)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def write_figures(result, out_dir, *, ds, test, encoders, figure_models, stacks, settings,
                  device, log=None) -> dict:
    """Every PNG of the report; returns {name: file name}."""
    from astromer_fast.evaluation.embeddings import embed_curves

    out_dir = Path(out_dir)
    figs = {}
    classes = result.classes
    spcs = result.settings["spc"]

    def save(fig, name):
        plots.save(fig, out_dir / name)
        figs[name[:-4]] = name

    fig = plots.new_figure(6.5, 4.2)
    plots.plot_f1_vs_spc(result.summary(), ax=fig.add_subplot(),
                         title="macro F1 on the shared test set (mean ± std over folds)")
    save(fig, "f1_vs_spc.png")

    for m in result.methods:
        fig = plots.new_figure(4.2 * len(spcs), 3.9)
        axes = fig.subplots(1, len(spcs), squeeze=False)[0]
        for ax, spc in zip(axes, spcs):
            plots.plot_confusion(result.confusion(m, spc), classes, ax=ax,
                                 title=f"{m}, {spc} SPC (all folds)")
        save(fig, f"confusion_{slug(m)}.png")

    gam = [(e.name, {spc: result.gammas(f"{e.name} γ-weighted", spc) for spc in spcs})
           for e in encoders]
    gam = [(n, {k: v for k, v in g.items() if v is not None}) for n, g in gam]
    gam = [(n, g) for n, g in gam if g]
    if gam:
        fig = plots.new_figure(5.5 * len(gam), 3.8)
        axes = fig.subplots(1, len(gam), squeeze=False)[0]
        for ax, (name, g) in zip(axes, gam):
            plots.plot_gamma(g, ax=ax, title=f"learned γ weights, {name}")
        save(fig, "gamma.png")

    sel = test[_stratified(ds.labels[test], settings.tsne_max, settings.seed)]
    for e in encoders:
        model = figure_models.get(e.name, e.model)
        if e.name in stacks:
            st = stacks[e.name][sel]
        else:
            curves = np.unique(ds.rows[sel].ravel())
            per = np.full((len(ds.curves), model.config.n_blocks + 1, model.config.d_model),
                          np.nan, np.float32)
            per[curves], _ = embed_curves(model, ds.curves.take(curves), layers=True,
                                          device=device, batch_size=settings.batch_size,
                                          window_mode=settings.window_mode,
                                          min_obs=settings.min_obs)
            st = np.concatenate([per[ds.rows[sel, b]] for b in range(ds.rows.shape[1])], -1)
        ok = np.isfinite(st).all(axis=(1, 2))
        if ok.sum() >= 5:
            if log:
                log(f"t-SNE of {int(ok.sum())} test samples, {st.shape[1]} layers ({e.name})")
            k = st.shape[1]
            cols = min(k, 4)
            rows = -(-k // cols)
            fig = plots.new_figure(3.3 * cols, 3.2 * rows + 0.4)
            axes = fig.subplots(rows, cols, squeeze=False).ravel()
            for a in axes[k:]:
                a.set_visible(False)
            plots.plot_tsne_blocks(st[ok], ds.labels[sel][ok], classes, axes=axes[:k],
                                   seed=settings.seed)
            fig.suptitle(f"t-SNE of per-layer mean embeddings, test samples, {e.name}"
                         f"{' (finetuned)' if settings.finetune_steps else ''}", fontsize=10)
            save(fig, f"tsne_{slug(e.name)}.png")

        rng = np.random.default_rng(settings.seed)
        samples = [(c, int(rng.choice(test[ds.labels[test] == c])))
                   for c in classes if (ds.labels[test] == c).any()]
        fig = attention_figure(model, ds, samples, device,
                               title=f"first-block attention per head, {e.name}"
                               f"{' (finetuned)' if settings.finetune_steps else ''}")
        save(fig, f"attention_{slug(e.name)}.png")

    if result.finetune:
        names = sorted({k.split("|")[0] for k in result.finetune})
        fig = plots.new_figure(5.5 * len(spcs), 3.6 * len(names))
        axes = fig.subplots(len(names), len(spcs), squeeze=False)
        for i, name in enumerate(names):
            for j, spc in enumerate(spcs):
                hist = {f"fold {k.split('|')[2]}": v for k, v in result.finetune.items()
                        if k.split("|")[0] == name and int(k.split("|")[1]) == spc}
                plots.plot_learning_curves(hist, ax=axes[i, j], title=f"{name}, {spc} SPC")
        save(fig, "finetune.png")
    return figs


# ------------------------------------------------------------------------------------------------
# report.md
# ------------------------------------------------------------------------------------------------

CAPTIONS = {
    "f1_vs_spc": "Macro F1 on the shared test set against samples per class (mean ± std over "
                 "folds), every method (cf. paper Fig. 11).",
    "gamma": "Learned layer weights softmax(γ) of the γ-weighted classifier, mean ± std over "
             "folds; the dashed line is the initial 1/K (paper Fig. 13).",
    "finetune": "Masked-reconstruction finetuning curves per SPC and fold (solid: training "
                "loss, dashed: validation loss).",
}


def _caption(name: str) -> str:
    if name in CAPTIONS:
        return CAPTIONS[name]
    if name.startswith("confusion_"):
        return ("Row-normalised confusion matrices (rows: true class), counts summed over "
                "folds, one panel per SPC (paper Fig. 16).")
    if name.startswith("tsne_"):
        return ("t-SNE (perplexity 30, learning rate 1000) of the per-layer mean embeddings of "
                "test samples, coloured by class (paper Figs. 14-15).")
    if name.startswith("attention_"):
        return ("Attention each observation receives in the first block, per head and averaged, "
                "for one test sample of each class; the curve is folded at its Lomb-Scargle "
                "period for display only (the model sees it in time order; paper Figs. 8-9).")
    return ""


def write_report(result, out_dir) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    st = result.settings
    ds = result.dataset
    classes = result.classes
    spcs = st["spc"]
    L = ["# Few-label classification report", ""]
    L += [f"Data: `{ds['source']}`, label column `{ds['label_col']}`, bands {ds['bands']}"
          f"{' (concatenated per object)' if ds['concat_bands'] else ' (each curve a sample)'}; "
          f"split: {ds['split']}.", ""]
    counts = ds["counts"]
    L += _table(["class", "train pool", "test"],
                [[c, counts["train"].get(c, 0), counts["test"].get(c, 0)] for c in classes])
    L += ["", f"Test samples scored (shared by every fold and method): {ds['n_test_scored']}.",
          ""]
    if ds["encoders"]:
        L += ["Encoders:", ""]
        L += _table(["name", "source", "architecture", "weights (sha256 prefix)"],
                    [[n, f"`{e['source']}`",
                      f"{e['config']['name']}, {e['config']['n_blocks']} blocks, "
                      f"d={e['config']['d_model']}", e["weights"]]
                     for n, e in ds["encoders"].items()])
        L.append("")
    clf = st["classifier"]
    inputs = ("z-scored per layer and channel with the fold's training statistics (not in the "
              "paper: see ClassifierSettings)" if clf["standardize"]
              else "used raw, as in the paper")
    ft = (f"{st['finetune_steps']} masked-reconstruction steps per SPC and fold (batch "
          f"{st['finetune_batch_size']}, lr {st['finetune_lr']}), on that fold's training curves"
          if st["finetune_steps"] else "none")
    L += ["## Protocol", "",
          f"- {', '.join(map(str, spcs))} samples per class (SPC), {st['folds']} folds each; a "
          f"class short of SPC gives all its samples plus draws with replacement; seed "
          f"{st['seed']}.",
          f"- Finetuning: {ft}; the encoder is frozen while the classifier trains.",
          f"- Classifier: γ-weighted layer means (softmax γ, init 1/K, sum divided by K) -> "
          f"Dense 1024-512-256 ReLU -> LayerNorm -> Dense; Adam lr {clf['lr']}, batch "
          f"{clf['batch_size']}, at most {clf['max_epochs']} epochs, early stopping (patience "
          f"{clf['patience']}) on {st['val_fraction']:.0%} of each fold's distinct samples, "
          f"best weights kept; inputs {inputs}. Baselines go through the same network: "
          f"last-block mean (K = 1) and hand-crafted features (always standardised; "
          f"{_feature_set_words(st.get('feature_set'))}).",
          f"- Preprocessing: {st['cleaning']} cleaning, windows `{st['window_mode']}`, curves "
          f"with fewer than {st['min_obs']} observations left out; curve embedding = window "
          f"embeddings averaged with valid-count weights; device {st['device']}.",
          ""]
    L += ["## Macro F1 on the test set (mean ± std over folds)", ""]
    L += macro_f1_table(result)
    L.append("")
    L += ["## Per-class F1 (mean over folds)", ""]
    for spc in spcs:
        L += [f"### {spc} SPC", ""]
        rows = []
        for m in result.methods:
            pc = result.per_class(m, spc)
            if len(pc):
                rows.append([m, *[f"{v:.3f}" for v in pc.mean(0)]])
        L += _table(["method", *classes], rows)
        L.append("")
    L += ["## Confusion matrices (counts summed over folds; rows: true, columns: predicted)", ""]
    for m in result.methods:
        for spc in spcs:
            cm = result.confusion(m, spc)
            if cm.ndim != 2:
                continue
            L += [f"**{m}, {spc} SPC**", ""]
            L += _table(["true \\ predicted", *classes],
                        [[c, *cm[i].tolist()] for i, c in enumerate(classes)])
            L.append("")
    gam_rows = []
    for m in result.methods:
        for spc in spcs:
            g = result.gammas(m, spc)
            if g is not None:
                gam_rows.append([m, spc, *[f"{v:.3f}" for v in g.mean(0)]])
    if gam_rows:
        k = max(len(r) - 2 for r in gam_rows)
        L += ["## Learned layer weights softmax(γ) (mean over folds)", ""]
        L += _table(["method", "SPC", "input", *[f"block {i}" for i in range(1, k)]], gam_rows)
        L.append("")
    L += ["## Finetuning", ""]
    if result.finetune:
        rows = []
        for key, hist in result.finetune.items():
            name, spc, fold = key.split("|")
            last = hist[-1] if hist else {}
            fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "–"  # noqa: E731
            rows.append([name, spc, fold, last.get("step", "–"), fmt(last.get("train_loss")),
                         fmt(last.get("val_loss")), fmt(last.get("val_rmse")),
                         fmt(last.get("val_r2"))])
        L += _table(["encoder", "SPC", "fold", "last step", "train loss", "val loss",
                     "val RMSE", "val R²"], rows)
    else:
        L.append("Skipped (finetune steps = 0)." if not st["finetune_steps"]
                 else "No history was returned.")
    L.append("")
    if result.figures:
        L += ["## Figures", ""]
        for name, fname in result.figures.items():
            L += [f"![{name}]({fname})", "", f"*{_caption(name)}*", ""]
    if result.notes:
        L += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    if result.seconds:
        L += ["## Time (s)", ""]
        L += _table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in result.seconds.items()])
        L.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(L))
    (out_dir / "results.json").write_text(json.dumps(result.to_json(), indent=1,
                                                     default=_json_default) + "\n")
    with open(out_dir / "runs.csv", "w", newline="") as f:
        cols = ["method", "spc", "fold", "macro_f1", "accuracy", "n_train", "n_val", "n_test",
                "best_epoch", "classifier_seconds"] + [f"f1_{c}" for c in classes]
        w = csv.writer(f)
        w.writerow(cols)
        for r in result.runs:
            w.writerow([r[c] for c in cols[:10]] + [f"{v:.4f}" for v in r["per_class_f1"]])
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _feature_set_words(feature_set) -> str:
    if feature_set == "light-curve":
        return "the light-curve package's extractors, periods as log10 days"
    if feature_set == "builtin":
        return "the 16 builtin statistics of astromer_fast.evaluation.features"
    return "none"
