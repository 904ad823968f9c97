"""Downstream evaluation: the paper's few-label classification protocol (SPEC section 5).

``evaluate`` runs it end to end and writes a report folder (``astromer-fast evaluate`` on the
command line); the pieces are usable alone: ``make_folds`` (samples per class, folds),
``fit_classifier`` (γ-weighted MLP), ``light_curve_features`` (a hand-crafted baseline), the plots
of ``evaluation.plots``, and scikit-learn wrappers in ``evaluation.sklearn`` (needs scikit-learn,
the ``eval`` extra)."""

from astromer_fast.evaluation.classifier import (
    ClassifierSettings,
    EmbeddingClassifier,
    GammaWeighting,
    TrainedClassifier,
    fit_classifier,
)
from astromer_fast.evaluation.features import (
    FEATURE_NAMES,
    best_period,
    light_curve_features,
    lomb_scargle,
)
from astromer_fast.evaluation.protocol import FoldSample, make_folds, sample_per_class
from astromer_fast.evaluation.run import EvalSettings, EvaluationResult, evaluate

__all__ = [
    "FEATURE_NAMES",
    "ClassifierSettings",
    "EmbeddingClassifier",
    "EvalSettings",
    "EvaluationResult",
    "FoldSample",
    "GammaWeighting",
    "TrainedClassifier",
    "best_period",
    "evaluate",
    "fit_classifier",
    "light_curve_features",
    "lomb_scargle",
    "make_folds",
    "sample_per_class",
]
