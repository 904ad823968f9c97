"""scikit-learn building blocks: light curves in, embeddings (or features) out, and the paper's
γ-weighted classifier, so they compose in a ``Pipeline``::

    from sklearn.pipeline import make_pipeline
    from astromer_fast.evaluation.sklearn import AstromerEmbedder, GammaMLPClassifier

    clf = make_pipeline(AstromerEmbedder(layers=True), GammaMLPClassifier(n_layers=7))
    clf.fit(train_table, train_labels)          # an Arrow table of light curves, or a list of
    clf.predict(test_curves)                    # (t, m) / (t, m, err) arrays per curve

Light curves may be given as a ``pyarrow.Table`` (one curve per row, any layout
``astromer_fast.data.layouts`` detects: nested list<struct>, struct of lists, parallel lists), a
pandas DataFrame of the same, ``astromer_fast.data.Curves``, or a sequence of ``(t, m)`` or
``(t, m, err)`` arrays. Rows of the output follow the input, one per curve.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted

ON_SHORT = ("raise", "nan", "zero")


def as_curves(X):
    """Any supported light-curve container -> ``Curves`` (one per input row, uncleaned).

    A table whose band column holds one value per observation is refused: Astromer embeds one
    band at a time, and such a row would be several curves (``embed(table)`` gives one row per
    (id, band))."""
    import pyarrow as pa

    from astromer_fast.data import Curves
    from astromer_fast.embedding.embedder import as_curves as arrays_as_curves

    if isinstance(X, Curves):
        return X
    if hasattr(X, "columns") and hasattr(X, "iloc"):  # pandas DataFrame
        X = pa.Table.from_pandas(X, preserve_index=False)
    if isinstance(X, pa.RecordBatch):
        X = pa.Table.from_batches([X])
    if isinstance(X, pa.Table):
        from astromer_fast.data.layouts import decode_batch, detect_layout

        layout = detect_layout(X.schema, "input table")
        if layout.kind == "long":
            raise ValueError("a long table (one row per observation) cannot be aligned with one "
                             "label per row; group it into one light curve per row first")
        if layout.band_per_obs:
            raise ValueError(f"the band column {layout.band!r} holds one band per observation: "
                             "a row would be several single-band curves. Give one row per "
                             "(object, band), or use astromer_fast.embed(table)")
        return decode_batch(X, layout).curves
    items = list(X)
    if len({len(it) for it in items if hasattr(it, "__len__")}) > 1:
        # As this wrapper always did: errors (used only by the cleaning) count when every
        # curve has them.
        items = [tuple(it)[:2] for it in items]
    return arrays_as_curves(items)


def _clean(curves, cleaning):
    from astromer_fast.evaluation.dataset import clean_curves

    return clean_curves(curves, cleaning)


def _handle_short(out, ok, on_short, what):
    if ok.all():
        return out
    bad = np.flatnonzero(~ok)
    if on_short == "raise":
        raise ValueError(f"{len(bad)} light curve(s) could not be {what} (fewer valid "
                         f"observations than min_obs after cleaning), e.g. rows "
                         f"{bad[:10].tolist()}; drop them or pass on_short='nan' / 'zero'")
    out[bad] = np.nan if on_short == "nan" else 0.0
    return out


class AstromerEmbedder(TransformerMixin, BaseEstimator):
    """Light curves -> Astromer embeddings, one row per curve, by ``astromer_fast.Embedder``
    (the cleaning, windows and pooling of ``embed``).

    ``layers=False``: the last block's mean, (N, d_model). ``layers=True``: the (n_blocks + 1)
    per-layer means flattened layer-major, (N, (n_blocks + 1) · d_model), the input of
    :class:`GammaMLPClassifier`. ``fit`` loads the model (nothing is trained). ``model``: a
    packaged name, a ``save_pretrained`` directory, a released checkpoint or an ``Astromer``
    (``None``: the packaged default). ``cleaning``: "basic" (``embed``'s own) or "official"
    (also the paper's 0 < err < 1 and 1st..99th magnitude percentile cuts, first).
    ``on_short``: what to do with a curve left with fewer than ``min_obs`` observations:
    ``"raise"``, or give it a row of NaN / zeros.
    """

    def __init__(self, model=None, *, layers: bool = False, device=None, batch_size: int = 256,
                 cleaning: str = "basic", window_mode: str = "overlap", min_obs: int = 5,
                 on_short: str = "raise", precision: str | None = None):
        self.model = model
        self.layers = layers
        self.device = device
        self.batch_size = batch_size
        self.cleaning = cleaning
        self.window_mode = window_mode
        self.min_obs = min_obs
        self.on_short = on_short
        self.precision = precision

    def fit(self, X=None, y=None):
        from astromer_fast.embedding.embedder import Embedder
        from astromer_fast.evaluation.dataset import CLEANINGS

        if self.on_short not in ON_SHORT:
            raise ValueError(f"on_short must be one of {ON_SHORT}, got {self.on_short!r}")
        if self.cleaning not in CLEANINGS:
            raise ValueError(f"cleaning must be one of {CLEANINGS}, got {self.cleaning!r}")
        self.embedder_ = Embedder(self.model, precision=self.precision, device=self.device,
                                  window_mode=self.window_mode, min_obs=self.min_obs,
                                  batch_size=self.batch_size, layers=self.layers)
        self.model_ = self.embedder_.model
        self.device_ = self.embedder_.device
        cfg = self.model_.config
        self.n_layers_ = cfg.n_blocks + 1 if self.layers else 1
        self.d_model_ = cfg.d_model
        self._n_features_out = self.n_layers_ * self.d_model_
        return self

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self, "model_")
        curves = as_curves(X)
        if self.cleaning == "official":
            curves = _clean(curves, "official")
        emb, rejected = self.embedder_.embed_rows(curves)
        emb = emb.reshape(len(curves), -1)
        ok = np.ones(len(curves), bool)
        ok[list(rejected)] = False
        return _handle_short(emb, ok, self.on_short, "embedded")

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        check_is_fitted(self, "model_")
        if not self.layers:
            return np.array([f"astromer_{j}" for j in range(self.d_model_)], dtype=object)
        names = ["input" if k == 0 else f"block{k}" for k in range(self.n_layers_)]
        return np.array([f"{n}_{j}" for n in names for j in range(self.d_model_)],
                        dtype=object)


class LightCurveFeatures(TransformerMixin, BaseEstimator):
    """Light curves -> the hand-crafted statistics of ``evaluation.features`` (N, 16)."""

    def __init__(self, *, cleaning: str = "official", min_period: float = 0.2,
                 min_obs: int = 5, on_short: str = "raise"):
        self.cleaning = cleaning
        self.min_period = min_period
        self.min_obs = min_obs
        self.on_short = on_short

    def fit(self, X=None, y=None):
        from astromer_fast.evaluation.features import FEATURE_NAMES

        self.feature_names_ = np.array(FEATURE_NAMES, dtype=object)
        self._n_features_out = len(FEATURE_NAMES)
        return self

    def transform(self, X) -> np.ndarray:
        from astromer_fast.evaluation.features import light_curve_features

        check_is_fitted(self, "feature_names_")
        curves = _clean(as_curves(X), self.cleaning)
        out = light_curve_features(curves, min_period=self.min_period)
        ok = curves.lengths >= max(self.min_obs, 1)
        return _handle_short(out, ok, self.on_short, "described")

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        check_is_fitted(self, "feature_names_")
        return self.feature_names_.copy()


class GammaMLPClassifier(ClassifierMixin, BaseEstimator):
    """The paper's classifier on (N, n_layers · D) inputs (layer-major, as
    :class:`AstromerEmbedder` with ``layers=True`` writes them): softmax(γ)-weighted mean of the
    layers, Dense 1024-512-256 ReLU, LayerNorm, Dense. ``n_layers=1`` makes it a plain MLP (on
    features or a single embedding). ``val_fraction`` of the training samples (stratified) drive
    early stopping. After ``fit``: ``classes_``, ``gamma_`` (softmax(γ)), ``history_``."""

    def __init__(self, n_layers: int = 7, *, lr: float = 1e-3, batch_size: int = 64,
                 max_epochs: int = 200, patience: int = 20, val_fraction: float = 0.2,
                 standardize: bool = True, seed: int = 0, device=None):
        self.n_layers = n_layers
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.standardize = standardize
        self.seed = seed
        self.device = device

    def fit(self, X, y):
        from astromer_fast.evaluation.classifier import ClassifierSettings, fit_classifier
        from astromer_fast.evaluation.protocol import split_validation

        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X must be (n_samples, n_features) matching y; got {X.shape}, "
                             f"{y.shape}")
        if not np.isfinite(X).all():
            raise ValueError("X holds NaN or infinite values (curves that could not be "
                             "embedded?); drop those rows first")
        rng = np.random.default_rng(self.seed)
        tr, va = split_validation(np.arange(len(y)), y, self.val_fraction, rng)
        settings = ClassifierSettings(lr=self.lr, batch_size=self.batch_size,
                                      max_epochs=self.max_epochs, patience=self.patience,
                                      standardize=self.standardize, seed=self.seed,
                                      device=self.device)
        self.classes_ = np.unique(y)
        self.clf_ = fit_classifier(X[tr], y[tr], X[va], y[va], classes=self.classes_,
                                   settings=settings, n_layers=self.n_layers)
        self.gamma_ = self.clf_.gamma_weights()
        self.history_ = self.clf_.history
        self.n_features_in_ = X.shape[1]
        return self

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "clf_")
        return self.clf_.predict_proba(np.asarray(X, dtype=np.float32))

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]
