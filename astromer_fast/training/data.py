"""Training data: the embedding reader's layouts, the official cleaning, the paper's curve filter,
and one random 200-observation window per curve per epoch.

Curves are read with the same layout detection and vectorised decoding as ``astromer_fast.embed``
(``astromer_fast.data.layouts``), so any Parquet the embedder accepts can be trained on. A whole
pretraining set (the project's ~95k real curves, ~10 M observations) fits in memory several times
over, so it is read once and re-windowed every epoch.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from astromer_fast.data import Curves, basic_clean, make_windows, official_clean
from astromer_fast.data.layouts import decode_batch, detect_layout
from astromer_fast.data.preprocess import offsets_from_lengths


@dataclass
class CurveFilter:
    """The paper's selection of pretraining curves (Sect. 4.1): light curves "that exhibited
    Gaussian noise characteristics were removed based on the criteria |Kurtosis| > 10,
    |Skewness| > 1, and Std > 0.1". We read that as: a curve is kept as variable when at least one
    statistic departs from pure noise (``rule="any"``); ``rule="all"`` keeps only curves meeting all
    three, the other literal reading. Moments are of the magnitudes after the official cleaning;
    kurtosis is the excess (Fisher) kurtosis, 0 for a Gaussian."""

    kurtosis: float = 10.0
    skewness: float = 1.0
    std: float = 0.1
    rule: str = "any"

    def __post_init__(self):
        if self.rule not in ("any", "all"):
            raise ValueError(f"CurveFilter.rule must be 'any' or 'all', got {self.rule!r}")


def curve_moments(curves: Curves):
    """(std, skewness, excess kurtosis) of each curve's magnitudes, vectorised (population
    moments; 0 where a curve has fewer than 2 observations or no spread)."""
    n = curves.lengths.astype(np.float64)
    starts = curves.offsets[:-1]
    nonempty = n > 0
    mag = curves.mag.astype(np.float64)

    def per_curve_sum(x):
        out = np.zeros(len(n))
        if len(x):
            s = np.add.reduceat(x, starts[nonempty]) if nonempty.any() else np.zeros(0)
            out[nonempty] = s
        return out

    mean = per_curve_sum(mag) / np.maximum(n, 1)
    d = mag - np.repeat(mean, curves.lengths)
    m2 = per_curve_sum(d * d) / np.maximum(n, 1)
    m3 = per_curve_sum(d ** 3) / np.maximum(n, 1)
    m4 = per_curve_sum(d ** 4) / np.maximum(n, 1)
    spread = m2 > 1e-20
    std = np.sqrt(m2)
    skew = np.where(spread, m3 / np.where(spread, m2, 1) ** 1.5, 0.0)
    kurt = np.where(spread, m4 / np.where(spread, m2, 1) ** 2 - 3.0, 0.0)
    return std, skew, kurt


def filter_mask(curves: Curves, f: CurveFilter) -> np.ndarray:
    std, skew, kurt = curve_moments(curves)
    tests = np.stack([np.abs(kurt) > f.kurtosis, np.abs(skew) > f.skewness, std > f.std])
    return tests.any(axis=0) if f.rule == "any" else tests.all(axis=0)


@dataclass
class TrainingCurves:
    """Cleaned curves kept for training, and an account of every curve that was not."""

    curves: Curves
    ids: np.ndarray
    sources: np.ndarray  # index into ``files`` per kept curve
    files: list
    counts: dict = field(default_factory=dict)  # why curves were left out, with how many

    def __len__(self) -> int:
        return len(self.curves)

    def split(self, fraction: float, seed: int):
        """(train, validation) by a seeded random split of curves."""
        n = len(self)
        perm = np.random.default_rng(seed).permutation(n)
        n_val = max(1, int(round(fraction * n))) if n > 1 and fraction > 0 else 0
        return self.take(np.sort(perm[n_val:])), self.take(np.sort(perm[:n_val]))

    def take(self, idx) -> "TrainingCurves":
        idx = np.asarray(idx, dtype=np.int64)
        return TrainingCurves(self.curves.take(idx), self.ids[idx], self.sources[idx], self.files,
                              dict(self.counts))


def expand_sources(sources) -> list:
    """Parquet paths from a path, glob, directory or a list of them (sorted, de-duplicated)."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    out = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            out += sorted(p.rglob("*.parquet"))
        elif any(c in str(s) for c in "*?["):
            out += [Path(x) for x in sorted(glob.glob(str(s), recursive=True))]
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {s}")
    seen, uniq = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            uniq.append(p)
    if not uniq:
        raise FileNotFoundError(f"no Parquet files found in {sources}")
    return uniq


def _concat_curves(parts: list) -> Curves:
    if not parts:
        return Curves.from_arrays([], [], [])
    lengths = np.concatenate([c.lengths for c in parts])
    err = None if any(c.err is None for c in parts) else np.concatenate([c.err for c in parts])
    return Curves(np.concatenate([c.time for c in parts]), np.concatenate([c.mag for c in parts]),
                  err, offsets_from_lengths(lengths))


def load_training_curves(sources, *, exclude_split: str | None = "test", split_col="split",
                         bands=None, min_obs: int = 5, curve_filter: CurveFilter | None = None,
                         table: pa.Table | None = None, log=None, **layout_kw) -> TrainingCurves:
    """Read, clean and select training curves.

    ``sources``: Parquet path(s)/glob/directory, or None with ``table`` (an Arrow table).
    Rows whose ``split_col`` equals ``exclude_split`` are left out (held out for evaluation).
    Cleaning: ``basic_clean`` (non-finite values, duplicate times, unsorted input), then the
    official cleaning (0 < err < 1, 1st..99th percentile of magnitude); then the optional paper
    filter; curves with fewer than ``min_obs`` observations left are dropped (see
    ``select_training_curves``; curves without errors get a constant one, ``with_errors``).
    """
    counts = {"read": 0}
    parts, ids, srcs = [], [], []
    items = [(None, table)] if table is not None else [(p, None) for p in expand_sources(sources)]
    files = [str(p) if p is not None else "<table>" for p, _ in items]
    for k, (path, tbl) in enumerate(items):
        try:
            if tbl is None:
                tbl = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise ValueError(f"{path}: cannot read Parquet ({e})") from e
        where = str(path) if path is not None else "table"
        if exclude_split is not None and split_col in tbl.column_names:
            keep = pc.fill_null(pc.not_equal(tbl[split_col], exclude_split), True)
            counts[f"split={exclude_split}"] = counts.get(f"split={exclude_split}", 0) + int(
                tbl.num_rows - pc.sum(keep).as_py() if tbl.num_rows else 0)
            tbl = tbl.filter(keep)
        layout = detect_layout(tbl.schema, where, **layout_kw)
        dec = decode_batch(tbl.select(layout.columns()), layout)
        c = dec.curves
        if bands is not None:
            sel = np.asarray(pc.fill_null(pc.is_in(dec.bands, value_set=pa.array(list(bands),
                             pa.string())), False).to_numpy(zero_copy_only=False), bool)
            counts["other band"] = counts.get("other band", 0) + int((~sel).sum())
            c = c.take(np.flatnonzero(sel))
            id_arr = np.asarray(dec.ids.to_pylist(), dtype=object)[sel]
        else:
            id_arr = np.asarray(dec.ids.to_pylist(), dtype=object)
        c = with_errors(c)  # per file: files with errors keep theirs when concatenated
        counts["read"] += len(c)
        parts.append(c)
        ids.append(id_arr)
        srcs.append(np.full(len(c), k, np.int64))
    curves = _concat_curves(parts)
    ids = np.concatenate(ids) if ids else np.zeros(0, object)
    sources_idx = np.concatenate(srcs) if srcs else np.zeros(0, np.int64)
    return select_training_curves(curves, ids, sources_idx, files, counts, min_obs=min_obs,
                                  curve_filter=curve_filter, log=log)


def with_errors(c: Curves) -> Curves:
    """Training needs errors for its weighted loss: curves without any get a constant error,
    which the loss's per-window min-max scaling turns into uniform weights."""
    if c.err is not None:
        return c
    return Curves(c.time, c.mag, np.full(c.n_obs, 0.1, np.float32), c.offsets)


def select_training_curves(curves: Curves, ids, sources, files, counts: dict | None = None, *,
                           min_obs: int = 5, curve_filter: CurveFilter | None = None,
                           log=None) -> TrainingCurves:
    """Clean (``basic_clean``, then the official cleaning) and select (at least ``min_obs``
    observations left, then the optional paper filter) curves already read; ``ids``/``sources``
    run along ``curves``. ``counts`` receives how many were left out and why."""
    counts = {"read": len(curves)} if counts is None else counts
    curves, _ = basic_clean(with_errors(curves))
    curves, _ = official_clean(curves)
    keep = curves.lengths >= max(min_obs, 1)
    counts[f"fewer than {min_obs} obs after cleaning"] = int((~keep).sum())
    if curve_filter is not None:
        passed = filter_mask(curves, curve_filter)
        counts["paper filter (noise-like)"] = int((keep & ~passed).sum())
        keep &= passed
    idx = np.flatnonzero(keep)
    out = TrainingCurves(curves.take(idx), np.asarray(ids)[idx], np.asarray(sources)[idx],
                         list(files), counts)
    counts["kept"] = len(out)
    if log:
        log(f"curves: {counts}")
    return out


def epoch_windows(curves: Curves, epoch_seed: int):
    """One random 200-observation window per curve (SPEC section 1), centred and padded."""
    return make_windows(curves, mode="random", rng=np.random.default_rng(epoch_seed), min_obs=1)


def length_batches(n_valid: np.ndarray, batch_size: int, seed: int, group: int = 16,
                   drop_last: bool = False) -> list:
    """Shuffled batches of similar-length windows: shuffle, then sort within spans of ``group``
    batches, so each batch can be cut to its longest window (padded keys get zero attention
    weight, so the cut changes only the cost: most survey curves are far shorter than 200)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(n_valid))
    span = batch_size * group
    out = []
    for s in range(0, len(order), span):
        chunk = order[s:s + span]
        chunk = chunk[np.argsort(n_valid[chunk], kind="stable")]
        out += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    if drop_last:
        out = [b for b in out if len(b) == batch_size]
    perm = rng.permutation(len(out))
    return [out[i] for i in perm]
