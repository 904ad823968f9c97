"""The evaluation run: data -> (finetuned) encoders -> embeddings -> classifiers per (SPC, fold)
-> scores on the shared test set -> report folder.

Methods compared on exactly the same samples:

* ``<model> γ-weighted``: the paper's classifier on the (n_blocks + 1) layer means;
* ``<model> last block``: the same network on the last block's mean alone (the Astromer 1
  paper's embedding), one per model;
* ``features``: the same network on hand-crafted statistics (``evaluation.features``): the
  `light-curve` package's extractors when it is installed, else the builtin 16.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from astromer_fast.evaluation.classifier import ClassifierSettings, fit_classifier
from astromer_fast.evaluation.dataset import LabelledSet, load_labelled
from astromer_fast.evaluation.embeddings import (
    ArrayCache,
    cached_layers,
    embed_curves,
    embedding_cache,
    model_fingerprint,
    resolve_device,
)
from astromer_fast.evaluation.metrics import scores
from astromer_fast.evaluation.protocol import cap_per_class, make_folds

FEATURES = "features"


@dataclass
class EvalSettings:
    spc: tuple = (20, 100, 500)
    folds: int = 3
    seed: int = 0
    val_fraction: float = 0.2      # of each fold's distinct samples, for early stopping
    test_spc: int | None = None    # cap of the shared test set per class (None: all of it)
    finetune_steps: int = 0        # 0: no finetuning (encoders used as loaded)
    finetune_batch_size: int = 64
    finetune_lr: float = 1e-4
    cleaning: str = "official"
    window_mode: str = "overlap"
    min_obs: int = 5
    batch_size: int = 256          # windows per encoder call when embedding
    device: str | None = None
    features: bool = True          # the hand-crafted feature baseline
    feature_set: str | None = None  # "light-curve" or "builtin" (None: light-curve if installed)
    last_block: bool = True        # the last-block-mean baseline of every model
    figures: bool = True
    tsne_max: int = 600            # test samples in the t-SNE figure (stratified)
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)


@dataclass
class Encoder:
    name: str          # short label used in tables ("astromer2-base", "astromer1 (...)")
    model: object
    source: str        # what was asked for (path, packaged name)


@dataclass
class EvaluationResult:
    settings: dict
    dataset: dict
    classes: list
    methods: list
    runs: list                          # one dict per (method, spc, fold)
    finetune: dict = field(default_factory=dict)   # "encoder|spc|fold" -> history rows
    figures: dict = field(default_factory=dict)    # name -> path relative to the report dir
    notes: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    out_dir: str | None = None

    def summary(self) -> dict:
        """``{method: {spc: (mean, std) of macro F1 over folds}}``."""
        out: dict = {}
        for m in self.methods:
            for spc in self.settings["spc"]:
                v = [r["macro_f1"] for r in self.runs if r["method"] == m and r["spc"] == spc]
                if v:
                    out.setdefault(m, {})[spc] = (float(np.mean(v)), float(np.std(v)))
        return out

    def per_class(self, method, spc) -> np.ndarray:
        v = [r["per_class_f1"] for r in self.runs if r["method"] == method and r["spc"] == spc]
        return np.array(v, dtype=float)

    def confusion(self, method, spc) -> np.ndarray:
        """Counts summed over folds."""
        v = [r["confusion"] for r in self.runs if r["method"] == method and r["spc"] == spc]
        return np.sum(np.array(v, dtype=np.int64), axis=0)

    def gammas(self, method, spc) -> np.ndarray | None:
        v = [r["gamma"] for r in self.runs
             if r["method"] == method and r["spc"] == spc and r.get("gamma") is not None]
        return np.array(v, dtype=float) if v else None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["summary"] = {m: {str(s): v for s, v in by.items()} for m, by in self.summary().items()}
        return d


def describe_model(spec, model) -> str:
    from astromer_fast.weights.packaged import DEFAULT_MODEL

    if spec is None:
        return DEFAULT_MODEL
    if isinstance(spec, str):
        p = Path(spec)
        stem = p.name[:-4] if p.name.endswith(".zip") else p.name
        return stem or spec
    return f"{model.config.name}-{model_fingerprint(model)[:8]}"


def load_encoders(models, device) -> list[Encoder]:
    from astromer_fast.weights import load_model

    out, seen = [], set()
    for spec in models:
        model = load_model(spec, device=device)
        name = describe_model(spec, model)
        while name in seen:
            name += "'"
        seen.add(name)
        out.append(Encoder(name, model, "packaged default" if spec is None else str(spec)))
    return out


# ------------------------------------------------------------------------------------------------
# Finetuning (astromer_fast.training.finetune, written alongside this module)
# ------------------------------------------------------------------------------------------------

def finetune_available() -> bool:
    from astromer_fast import training

    return hasattr(training, "finetune")


def finetune_encoder(model, curves, *, steps: int, batch_size: int, lr: float, seed: int,
                     device=None, log=None):
    """Continue masked-reconstruction training of a copy of ``model`` on ``curves`` (raw
    ``Curves``: ``finetune`` cleans them itself) for ``steps`` steps. Returns (model, history)."""
    from astromer_fast import training

    fn = getattr(training, "finetune", None)
    if fn is None:
        raise RuntimeError("finetuning was asked for (finetune_steps > 0) but this astromer_fast "
                           "has no astromer_fast.training.finetune; run with finetune_steps=0 "
                           "(--finetune-steps 0)")
    wanted = dict(max_steps=int(steps), batch_size=int(batch_size), lr=float(lr),
                  seed=int(seed))
    make = getattr(training, "finetune_settings", None)
    cls = getattr(training, "TrainSettings", None)
    names = {f.name for f in dataclasses.fields(cls)} if cls is not None else set(wanted)
    base = make() if make is not None else (cls() if cls is not None else None)
    if base is not None:
        # A short finetune must validate more than once and warm up within its budget.
        if "val_every" in names and getattr(base, "val_every", 0) > max(1, steps // 10):
            wanted["val_every"] = max(1, steps // 10)
        if "warmup_steps" in names and getattr(base, "warmup_steps", 0) > steps // 10:
            wanted["warmup_steps"] = steps // 10
        if "max_epochs" in names:
            wanted["max_epochs"] = None  # the step budget decides
        settings = dataclasses.replace(base, **{k: v for k, v in wanted.items() if k in names})
    else:
        settings = None
    params = inspect.signature(fn).parameters
    kw = {}
    if "device" in params and device is not None:
        kw["device"] = str(device)
    if "log" in params:
        kw["log"] = log
    res = fn(copy.deepcopy(model), curves, settings=settings, **kw)
    return res.model.eval(), [dict(r) for r in (getattr(res, "history", None) or [])]


# ------------------------------------------------------------------------------------------------
# Features per sample
# ------------------------------------------------------------------------------------------------

def _sample_stack(per_curve: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(n_curves, K, D) per-curve arrays -> (n_samples, K, D · n_bands): bands concatenated."""
    return np.concatenate([per_curve[rows[:, b]] for b in range(rows.shape[1])], axis=-1)


def _feature_stack(ds: LabelledSet, curve_idx, cache_dir, log, feature_set: str = "builtin"):
    from astromer_fast.evaluation.features import feature_names, feature_set_version, features_of

    names = feature_names(feature_set)
    version = feature_set_version(feature_set)
    keys = [ds.keys[i] for i in curve_idx]
    cache = None
    if cache_dir is not None:
        prefix = "features" if feature_set == "builtin" else "features-lcpkg"
        cache = ArrayCache(cache_dir, f"{prefix}-v{version}-{ds.cleaning}", (1, len(names)),
                           {"what": f"hand-crafted features ({feature_set})",
                            "version": version, "names": list(names),
                            "cleaning": ds.cleaning})
        vals, found = cache.get(keys)
    else:
        vals = np.full((len(keys), 1, len(names)), np.nan, np.float32)
        found = np.zeros(len(keys), bool)
    todo = np.flatnonzero(~found)
    if len(todo):
        if log:
            log(f"features ({feature_set}) of {len(todo)} curve(s)")
        new = features_of(ds.curves.take(np.asarray(curve_idx)[todo]), feature_set)[:, None, :]
        vals[todo] = new
        if cache is not None:
            cache.put([keys[i] for i in todo], new)
    return vals


def _fill_standardisable(xtr, *others):
    """NaN/inf features (undefined statistics) -> the training mean of the column (0 if none)."""
    flat = xtr.reshape(len(xtr), -1)
    with np.errstate(invalid="ignore"):
        fill = np.nanmean(np.where(np.isfinite(flat), flat, np.nan), axis=0)
    fill = np.where(np.isfinite(fill), fill, 0.0).astype(np.float32)
    out = []
    for x in (xtr, *others):
        f = x.reshape(len(x), -1).copy()
        bad = ~np.isfinite(f)
        f[bad] = np.broadcast_to(fill, f.shape)[bad]
        out.append(f.reshape(x.shape))
    return out


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def evaluate(source, label_col: str = "label", *, models=(None,), out=None,
             split_col: str | None = "split", bands=None, concat_bands: bool = False,
             settings: EvalSettings | None = None, cache_dir=None, log=print,
             **load_kw) -> EvaluationResult:
    """Run the few-label protocol on a labelled table and (with ``out``) write the report folder.

    ``models``: encoders to compare (packaged names, ``save_pretrained`` directories, released
    TensorFlow checkpoints, ``Astromer`` objects; ``None`` = the packaged default); ``()`` runs
    the feature baseline alone. ``cache_dir`` (default ``out/cache``) keeps per-curve embeddings
    and features of unfinetuned encoders between runs.
    """
    s = settings or EvalSettings()
    log = log or (lambda *_: None)
    t_start = time.perf_counter()
    timings: dict = {}
    device = resolve_device(s.device)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    if cache_dir is None and out_dir is not None:
        cache_dir = out_dir / "cache"
    if s.finetune_steps > 0 and models and not finetune_available():
        raise RuntimeError("finetune_steps > 0 but astromer_fast.training.finetune does not exist "
                           "in this installation; use finetune_steps=0")

    feature_set = None
    if s.features:
        from astromer_fast.evaluation.features import resolve_feature_set

        feature_set = resolve_feature_set(s.feature_set, log)
    t0 = time.perf_counter()
    ds = load_labelled(source, label_col, split_col=split_col, bands=bands,
                       concat_bands=concat_bands, cleaning=s.cleaning, min_obs=s.min_obs,
                       seed=s.seed, **load_kw)
    classes = ds.classes.tolist()
    train_pool = np.flatnonzero(~ds.is_test)
    test_all = np.flatnonzero(ds.is_test)
    test = test_all[cap_per_class(ds.labels[test_all], s.test_spc, s.seed)]
    missing = sorted(set(classes) - set(ds.labels[train_pool].tolist()))
    if missing:
        raise ValueError(f"classes {missing} have test samples but no training sample")
    untested = sorted(set(classes) - set(ds.labels[test].tolist()))
    notes_extra = ([f"classes {untested} have no test sample: they are trained on but left out "
                    f"of the macro F1"] if untested else [])
    folds = make_folds(ds.labels[train_pool], s.spc, s.folds, s.seed, s.val_fraction)
    needed = np.unique(np.concatenate([train_pool[f.unique] for f in folds] + [test]))
    needed_curves = np.unique(ds.rows[needed].ravel())
    timings["load"] = time.perf_counter() - t0
    log(f"{len(ds.rows)} samples ({len(train_pool)} train pool, {len(test)} test), "
        f"{len(classes)} classes, bands {ds.bands}{' concatenated' if ds.concat else ''}")

    encoders = load_encoders(list(models), device)
    methods = []
    for e in encoders:
        methods.append(f"{e.name} γ-weighted")
        if s.last_block:
            methods.append(f"{e.name} last block")
    if s.features:
        methods.append(FEATURES)
    runs: list = []
    histories: dict = {}
    notes = list(ds.notes) + notes_extra
    prep = {"cleaning": s.cleaning, "window_mode": s.window_mode, "min_obs": s.min_obs,
            "window": None}
    embed_kw = dict(device=device, batch_size=s.batch_size, window_mode=s.window_mode,
                    min_obs=s.min_obs)
    figure_models = {}

    def score(method, fold, xtr, ytr, xva, yva, xte, standardize=False):
        cs = dataclasses.replace(s.classifier, seed=s.seed * 1000 + fold.fold,
                                 standardize=standardize or s.classifier.standardize,
                                 device=s.classifier.device or str(device))
        clf = fit_classifier(xtr, ytr, xva, yva, classes=np.array(classes, dtype=object),
                             settings=cs)
        pred = clf.predict(xte)
        r = {"method": method, "spc": fold.spc, "fold": fold.fold, "n_train": len(xtr),
             "n_val": len(xva), "n_test": len(xte), "best_epoch": clf.best_epoch,
             "classifier_seconds": round(clf.seconds, 2),
             "gamma": clf.gamma_weights().tolist() if clf.model.n_layers > 1 else None}
        r.update(scores(ds.labels[test_ok], pred, classes))
        runs.append(r)
        log(f"  {method:<34} spc {fold.spc:>4} fold {fold.fold}: macro F1 {r['macro_f1']:.3f}")
        return clf

    def run_fold(method_prefix, fold, per_sample_fn, k_layers):
        tr = train_pool[fold.train]
        va = train_pool[fold.val]
        xs = per_sample_fn()
        ok = np.isfinite(xs).all(axis=(1, 2))
        tr, va = tr[ok[tr]], va[ok[va]]
        xtr, xva, xte = xs[tr], xs[va], xs[test_ok]
        if not np.isfinite(xte).all():
            raise RuntimeError(f"{method_prefix}: non-finite embeddings of test samples "
                               f"(spc {fold.spc}, fold {fold.fold}); please report this")
        score(f"{method_prefix} γ-weighted", fold, xtr, ds.labels[tr], xva, ds.labels[va], xte)
        if s.last_block and k_layers > 1:
            score(f"{method_prefix} last block", fold, xtr[:, -1:], ds.labels[tr],
                  xva[:, -1:], ds.labels[va], xte[:, -1:])

    # Test samples that every method can score: the same set for all, so scores compare.
    test_ok = test
    per_encoder_stacks = {}
    if s.finetune_steps == 0:
        for e in encoders:
            t0 = time.perf_counter()
            cache = (embedding_cache(cache_dir, e.model, preprocessing={**prep,
                     "window": e.model.config.window}, device=embed_kw.get("device"))
                     if cache_dir is not None else None)
            per_curve = np.full((len(ds.curves), e.model.config.n_blocks + 1,
                                 e.model.config.d_model), np.nan, np.float32)
            vals, _ = cached_layers(e.model, ds.curves.take(needed_curves),
                                    [ds.keys[i] for i in needed_curves], cache=cache, log=log,
                                    **embed_kw)
            per_curve[needed_curves] = vals
            per_encoder_stacks[e.name] = _sample_stack(per_curve, ds.rows)
            timings[f"embed {e.name}"] = time.perf_counter() - t0
        for st in per_encoder_stacks.values():
            bad = ~np.isfinite(st[test_ok]).all(axis=(1, 2))
            if bad.any():
                notes.append(f"{int(bad.sum())} test sample(s) without an embedding left out")
                test_ok = test_ok[~bad]
    if s.features:
        t0 = time.perf_counter()
        from astromer_fast.evaluation.features import feature_names

        per_curve = np.full((len(ds.curves), 1, len(feature_names(feature_set))), np.nan,
                            np.float32)
        per_curve[needed_curves] = _feature_stack(ds, needed_curves, cache_dir, log,
                                                  feature_set)
        feat_stack = _sample_stack(per_curve, ds.rows)
        timings["features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if s.finetune_steps > 0:
        # Finetuned encoders differ per scenario: embed the fold's training samples and the
        # test set again with each (no cache: these weights exist only for this run).
        needed_test_curves = np.unique(ds.rows[test].ravel())
        for e in encoders:
            for fold in folds:
                fold_samples = train_pool[fold.unique]
                fold_curves = np.unique(ds.rows[fold_samples].ravel())
                log(f"finetuning {e.name} on {len(fold_curves)} curve(s) "
                    f"(spc {fold.spc}, fold {fold.fold}, {s.finetune_steps} steps)")
                tf = time.perf_counter()
                ft, hist = finetune_encoder(
                    e.model, ds.raw.take(fold_curves), steps=s.finetune_steps,
                    batch_size=s.finetune_batch_size, lr=s.finetune_lr,
                    seed=s.seed * 1000 + fold.spc * 10 + fold.fold, device=device, log=None)
                histories[f"{e.name}|{fold.spc}|{fold.fold}"] = hist
                timings[f"finetune {e.name}"] = (timings.get(f"finetune {e.name}", 0.0)
                                                 + time.perf_counter() - tf)
                idx = np.unique(np.concatenate([fold_curves, needed_test_curves]))
                per_curve = np.full((len(ds.curves), e.model.config.n_blocks + 1,
                                     e.model.config.d_model), np.nan, np.float32)
                per_curve[idx], _ = embed_curves(ft, ds.curves.take(idx), layers=True,
                                                 **embed_kw)
                stack = _sample_stack(per_curve, ds.rows)
                run_fold(e.name, fold, lambda st=stack: st, e.model.config.n_blocks + 1)
                if fold.fold == 0 and fold.spc == max(s.spc):
                    figure_models[e.name] = ft
    else:
        for e in encoders:
            for fold in folds:
                run_fold(e.name, fold, lambda st=per_encoder_stacks[e.name]: st,
                         e.model.config.n_blocks + 1)
            figure_models[e.name] = e.model
    if s.features:
        for fold in folds:
            tr, va = train_pool[fold.train], train_pool[fold.val]
            xtr, xva, xte = _fill_standardisable(feat_stack[tr], feat_stack[va],
                                                 feat_stack[test_ok])
            score(FEATURES, fold, xtr, ds.labels[tr], xva, ds.labels[va], xte, standardize=True)
    timings["protocol"] = time.perf_counter() - t0

    result = EvaluationResult(
        settings={**dataclasses.asdict(s), "spc": list(s.spc), "device": str(device),
                  "feature_set": feature_set,
                  "models": [e.source for e in encoders]},
        dataset={"source": "table" if not isinstance(source, (str, Path)) else str(source),
                 "label_col": label_col, "split": ds.split_source, "bands": ds.bands,
                 "concat_bands": ds.concat, "counts": ds.counts(), "n_test_scored": len(test_ok),
                 "encoders": {e.name: {"source": e.source, "config": e.model.config.to_dict(),
                                       "weights": model_fingerprint(e.model)}
                              for e in encoders}},
        classes=classes, methods=methods, runs=runs, finetune=histories, notes=notes,
        seconds=timings, out_dir=None if out_dir is None else str(out_dir))

    if out_dir is not None:
        if s.figures:
            from astromer_fast.evaluation.report import write_figures

            t0 = time.perf_counter()
            result.figures = write_figures(result, out_dir, ds=ds, test=test_ok,
                                           encoders=encoders, figure_models=figure_models,
                                           stacks=per_encoder_stacks, settings=s, device=device,
                                           log=log)
            timings["figures"] = time.perf_counter() - t0
        from astromer_fast.evaluation.report import write_report

        timings["total"] = time.perf_counter() - t_start
        write_report(result, out_dir)
    timings["total"] = time.perf_counter() - t_start
    return result
