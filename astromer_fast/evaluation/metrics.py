"""Classification scores in numpy (no scikit-learn needed to run the protocol)."""

from __future__ import annotations

import numpy as np


def confusion(y_true, y_pred, classes) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class, in ``classes`` order."""
    index = {c: i for i, c in enumerate(list(classes))}
    cm = np.zeros((len(index), len(index)), np.int64)
    for t, p in zip(np.asarray(y_true).tolist(), np.asarray(y_pred).tolist()):
        cm[index[t], index[p]] += 1
    return cm


def f1_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class F1; 0 for a class that is neither present nor predicted (scikit-learn's
    ``zero_division=0``)."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # (tp + fp) + (tp + fn)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def scores(y_true, y_pred, classes) -> dict:
    """Macro F1 over the classes present in ``y_true`` (a class with no test sample has no
    meaningful F1: it is NaN in ``per_class_f1`` and left out of the mean), accuracy, and the
    confusion matrix."""
    cm = confusion(y_true, y_pred, classes)
    f1 = f1_from_confusion(cm)
    present = cm.sum(1) > 0
    f1 = np.where(present, f1, np.nan)
    return {"macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
            "per_class_f1": f1.tolist(),
            "accuracy": float(np.trace(cm) / max(cm.sum(), 1)), "confusion": cm.tolist()}


def row_normalise(cm) -> np.ndarray:
    cm = np.asarray(cm, dtype=np.float64)
    s = cm.sum(1, keepdims=True)
    return np.divide(cm, s, out=np.zeros_like(cm), where=s > 0)
