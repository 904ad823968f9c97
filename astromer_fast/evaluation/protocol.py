"""The paper's few-label protocol (SPEC section 5; paper Sect. 5.1): samples per class, folds,
and the held-out test set every fold is scored on.

For each SPC (samples per class, 20/100/500 in the paper) and each of ``n_folds`` folds, a training
set of exactly ``spc`` samples per class is drawn from the labelled training pool. A class with
fewer than ``spc`` samples contributes every one of them once and the shortfall is drawn with
replacement, so no available label is left unused and the class still weighs ``spc`` in training.
Every fold of every SPC is scored on one shared test set, so scores are comparable across SPC.

Draws depend only on ``(seed, spc, fold)`` and the pool, never on the order the scenarios run in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FoldSample:
    """One training scenario: ``train`` and ``val`` are indices into the labelled training pool
    (``val`` for the classifier's early stopping; disjoint from ``train`` by sample, so a sample
    duplicated by replacement never sits on both sides)."""

    spc: int
    fold: int
    train: np.ndarray
    val: np.ndarray

    @property
    def indices(self) -> np.ndarray:
        """Every drawn index (train then val), duplicates included."""
        return np.concatenate([self.train, self.val])

    @property
    def unique(self) -> np.ndarray:
        return np.unique(self.indices)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])


def sample_per_class(labels, spc: int, rng: np.random.Generator, classes=None) -> np.ndarray:
    """Exactly ``spc`` indices per class of ``labels`` (classes in sorted order, then shuffled
    within the class). Without replacement when a class has at least ``spc`` samples; otherwise
    all of them once plus ``spc - n`` drawn with replacement."""
    labels = np.asarray(labels)
    if spc < 1:
        raise ValueError(f"spc must be >= 1, got {spc}")
    classes = np.unique(labels) if classes is None else classes
    out = []
    for c in classes:
        pool = np.flatnonzero(labels == c)
        if len(pool) == 0:
            raise ValueError(f"class {c!r} has no sample to draw from")
        if len(pool) >= spc:
            pick = rng.choice(pool, size=spc, replace=False)
        else:
            pick = np.concatenate([rng.permutation(pool),
                                   rng.choice(pool, size=spc - len(pool), replace=True)])
        out.append(pick)
    return np.concatenate(out).astype(np.int64)


def split_validation(indices, labels, val_fraction: float, rng: np.random.Generator):
    """Split drawn ``indices`` into (train, val) per class by *distinct* sample: about
    ``val_fraction`` of each class's distinct samples go to validation (at least one when the
    class has two or more distinct samples, never all of them); their duplicates go with them."""
    indices = np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels)
    if val_fraction <= 0:
        return indices, np.zeros(0, np.int64)
    val_set = []
    for c in np.unique(labels[indices]):
        distinct = np.unique(indices[labels[indices] == c])
        if len(distinct) < 2:
            continue
        k = min(max(1, int(round(val_fraction * len(distinct)))), len(distinct) - 1)
        val_set.append(rng.choice(distinct, size=k, replace=False))
    if not val_set:
        return indices, np.zeros(0, np.int64)
    in_val = np.isin(indices, np.concatenate(val_set))
    return indices[~in_val], indices[in_val]


def make_folds(labels, spcs=(20, 100, 500), n_folds: int = 3, seed: int = 0,
               val_fraction: float = 0.2) -> list[FoldSample]:
    """Every (spc, fold) scenario over a labelled training pool, in (spc, fold) order."""
    labels = np.asarray(labels)
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
    classes = np.unique(labels)
    out = []
    for spc in spcs:
        for fold in range(n_folds):
            rng = _rng(seed, spc, fold)
            drawn = sample_per_class(labels, int(spc), rng, classes)
            train, val = split_validation(drawn, labels, val_fraction, rng)
            out.append(FoldSample(int(spc), fold, train, val))
    return out


def cap_per_class(labels, cap: int | None, seed: int = 0) -> np.ndarray:
    """Indices keeping at most ``cap`` samples per class (without replacement, seeded; all of them
    when ``cap`` is None), in increasing order: the shared test set."""
    labels = np.asarray(labels)
    if cap is None:
        return np.arange(len(labels), dtype=np.int64)
    rng = _rng(seed, 0xC0FFEE)
    keep = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        keep.append(pool if len(pool) <= cap else rng.choice(pool, size=cap, replace=False))
    return np.sort(np.concatenate(keep)).astype(np.int64)


def stratified_split(labels, groups=None, test_fraction: float = 0.25, seed: int = 0):
    """A train/test split when the data has none: per class, about ``test_fraction`` of the
    groups (objects: every band of one object lands on the same side) go to test. Returns a
    boolean mask, True for test."""
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = _rng(seed, 0x7E57)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        g = np.unique(groups[labels == c])
        k = int(round(test_fraction * len(g)))
        if len(g) >= 2:
            k = min(max(k, 1), len(g) - 1)
        test |= (labels == c) & np.isin(groups, rng.choice(g, size=k, replace=False))
    return test
