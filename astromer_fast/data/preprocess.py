"""Vectorised light-curve preprocessing: cleaning, windowing, centring, padding, pretraining masks.

A batch of light curves is held the way Arrow holds a ``list<struct<...>>`` column: flat arrays of
every observation back to back (``time`` float64, ``mag`` float32, ``err`` float32 or ``None``) and
an ``offsets`` array (int64, ``n_curves + 1`` entries) so that curve ``i`` is
``[offsets[i], offsets[i+1])``. Every operation below works on these flat arrays with numpy, with
no Python loop over observations or curves: per-curve statistics come from sorting by
(curve, value) and index arithmetic, per-window statistics from fancy-indexed (N, L) gathers.

Conventions (see ``SPEC.md`` sections 1 and 4):

* Time stays float64 until it has been centred per window; only the centred offsets are cast to
  float32 (MJD ~ 5e4 has a float32 resolution of ~4 ms, too coarse for the positional encoding).
* Means are taken over the valid observations of a window only, never over padding.
* Padding is 0 in every padded array; ``valid`` says which cells are real.
* Errors are kept raw (not centred): the pretraining loss weights use the original errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

WINDOW = 200
MIN_OBS = 5
WINDOW_MODES = ("overlap", "nonoverlap", "random")
# Finite values beyond these are not measurements (sentinels, unit mistakes, corrupt values),
# and they would overflow float32 arithmetic downstream. The time bound covers MJD, JD and BJD in
# days; no astronomical magnitude comes near the magnitude bound.
TIME_LIMIT = 1e7
MAG_LIMIT = 1e3
# Windows gathered per block in make_windows: bounds the float64 temporaries (~50 MB per array).
_GATHER_BLOCK = 32768


# ---------------------------------------------------------------------------------------------
# Ragged-array helpers
# ---------------------------------------------------------------------------------------------

def offsets_from_lengths(lengths) -> np.ndarray:
    """``[0, l0, l0+l1, ...]`` as int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _ragged_arange(starts, counts) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for every (s, c), without a Python loop."""
    starts = np.asarray(starts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    # Position inside its run = global position - where the run begins in the output.
    run_begin = offsets_from_lengths(counts)[:-1]
    return np.repeat(starts - run_begin, counts) + np.arange(total, dtype=np.int64)


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)  # None -> fresh entropy; an int -> seeded


# ---------------------------------------------------------------------------------------------
# Curves: a batch of ragged light curves
# ---------------------------------------------------------------------------------------------

@dataclass
class Curves:
    """Light curves as flat observation arrays plus int64 ``offsets`` (Arrow-style)."""

    time: np.ndarray
    mag: np.ndarray
    err: np.ndarray | None
    offsets: np.ndarray

    def __post_init__(self):
        self.time = np.ascontiguousarray(self.time, dtype=np.float64).reshape(-1)
        self.mag = np.ascontiguousarray(self.mag, dtype=np.float32).reshape(-1)
        if self.err is not None:
            self.err = np.ascontiguousarray(self.err, dtype=np.float32).reshape(-1)
        self.offsets = np.ascontiguousarray(self.offsets, dtype=np.int64).reshape(-1)
        n_obs = len(self.time)
        if len(self.offsets) == 0 or self.offsets[0] != 0 or self.offsets[-1] != n_obs:
            raise ValueError(f"offsets must start at 0 and end at the number of observations "
                             f"({n_obs}); got {self.offsets[:1]}..{self.offsets[-1:]}")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must be non-decreasing")
        if len(self.mag) != n_obs or (self.err is not None and len(self.err) != n_obs):
            raise ValueError("time, mag and err must have the same length")

    # -- shape ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Observations per curve (int64)."""
        return np.diff(self.offsets)

    @property
    def n_obs(self) -> int:
        return int(self.offsets[-1])

    def curve_index(self) -> np.ndarray:
        """For every flat observation, the index of its curve (int64)."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.lengths)

    def curve(self, i: int):
        """``(time, mag, err)`` of curve ``i`` (views)."""
        s = slice(self.offsets[i], self.offsets[i + 1])
        return self.time[s], self.mag[s], None if self.err is None else self.err[s]

    # -- selection -----------------------------------------------------------------------------
    def take(self, idx) -> "Curves":
        """The curves ``idx`` (integer indices or a boolean mask over curves), in that order."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False)
        lengths = self.lengths[idx]
        flat = _ragged_arange(self.offsets[:-1][idx], lengths)
        return Curves(self.time[flat], self.mag[flat],
                      None if self.err is None else self.err[flat], offsets_from_lengths(lengths))

    def keep_observations(self, keep: np.ndarray) -> "Curves":
        """Keep the flat observations where ``keep`` is True; every curve stays (maybe empty)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != self.time.shape:
            raise ValueError("keep must be a boolean mask over the flat observations")
        lengths = np.bincount(self.curve_index()[keep], minlength=len(self))
        return Curves(self.time[keep], self.mag[keep],
                      None if self.err is None else self.err[keep], offsets_from_lengths(lengths))

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, times, mags, errs=None) -> "Curves":
        """From per-curve sequences (lists of arrays). Convenience for tests and small inputs."""
        times = [np.asarray(t, dtype=np.float64).reshape(-1) for t in times]
        mags = [np.asarray(m, dtype=np.float32).reshape(-1) for m in mags]
        if len(times) != len(mags) or (errs is not None and len(errs) != len(times)):
            raise ValueError("times, mags (and errs) must hold the same number of curves")
        lengths = np.array([len(t) for t in times], dtype=np.int64)
        if any(len(m) != n for m, n in zip(mags, lengths)):
            raise ValueError("each curve's mag must be as long as its time")
        cat = (lambda parts, dt: np.concatenate(parts).astype(dt, copy=False) if parts
               else np.zeros(0, dt))
        err = None
        if errs is not None:
            errs = [np.asarray(e, dtype=np.float32).reshape(-1) for e in errs]
            if any(len(e) != n for e, n in zip(errs, lengths)):
                raise ValueError("each curve's err must be as long as its time")
            err = cat(errs, np.float32)
        return cls(cat(times, np.float64), cat(mags, np.float32), err,
                   offsets_from_lengths(lengths))

    @classmethod
    def from_arrow(cls, data, time: str = "time", mag: str = "mag", err: str | None = "magerr",
                   *, column: str = "lightcurve") -> "Curves":
        """Flatten a ``list<struct<time, mag, magerr>>`` Arrow column into ``Curves``.

        ``data``: a ``pyarrow.Table`` / ``RecordBatch`` (its ``column`` is used), a
        ``ChunkedArray`` or a list array (``list``, ``large_list`` or ``fixed_size_list``).
        Sliced arrays (list offsets not starting at 0) and chunked columns are handled; a null list
        becomes an empty curve, a null struct or null field value becomes NaN (``basic_clean``
        then drops it). ``err=None`` reads no error column (``Curves.err`` is then ``None``).
        """
        import pyarrow as pa

        if isinstance(data, (pa.Table, pa.RecordBatch)):
            data = data.column(column)
        chunks = data.chunks if isinstance(data, pa.ChunkedArray) else [data]
        parts = [_flatten_list_array(c, time, mag, err) for c in chunks]
        if not parts:
            return cls(np.zeros(0), np.zeros(0, np.float32),
                       None if err is None else np.zeros(0, np.float32), np.zeros(1, np.int64))
        lengths = np.concatenate([p[3] for p in parts])
        return cls(np.concatenate([p[0] for p in parts]),
                   np.concatenate([p[1] for p in parts]),
                   None if err is None else np.concatenate([p[2] for p in parts]),
                   offsets_from_lengths(lengths))

    def to_arrow(self, time: str = "time", mag: str = "mag", err: str = "magerr"):
        """The inverse of ``from_arrow``: a ``list<struct<time: double, mag: float, magerr:
        float>>`` array (``large_list`` if the offsets do not fit in int32)."""
        import pyarrow as pa

        arrays = [pa.array(self.time), pa.array(self.mag)]
        names = [time, mag]
        if self.err is not None:
            arrays.append(pa.array(self.err))
            names.append(err)
        values = pa.StructArray.from_arrays(arrays, names=names)
        if self.n_obs < 2**31:
            return pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32)), values)
        return pa.LargeListArray.from_arrays(pa.array(self.offsets), values)


def _flatten_list_array(arr, time, mag, err):
    """One Arrow list array -> (time f64, mag f32, err f32 | None, lengths int64)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise TypeError(f"expected a list<struct<...>> column, got {t}")
    if not pa.types.is_struct(t.value_type):
        raise TypeError(f"expected list elements of struct type, got {t.value_type}")
    names = [f.name for f in t.value_type]
    for name in (time, mag) + (() if err is None else (err,)):
        if name not in names:
            raise KeyError(f"field {name!r} not in the light-curve struct (fields: {names})")

    # Lengths from the list array itself (respects its slice offset; null lists -> 0), values via
    # flatten(), which also applies the slice offset and skips whatever a null list points at.
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    lengths = lengths.astype(np.int64, copy=False)
    values = arr.flatten()
    if int(lengths.sum()) != len(values):
        raise ValueError("list lengths and flattened values disagree (unsupported list layout)")

    def column(name, dtype):
        # struct_field honours the struct's own offset and null bitmap (null struct -> null).
        col = pc.struct_field(values, name)
        col = pc.cast(col, pa.float64() if dtype == np.float64 else pa.float32())
        if col.null_count:
            col = pc.fill_null(col, float("nan"))
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=dtype)

    return (column(time, np.float64), column(mag, np.float32),
            None if err is None else column(err, np.float32), lengths)


# ---------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------

@dataclass
class CleanReport:
    """What ``basic_clean`` did, per curve (int64 / bool arrays of length ``n_curves``).

    Drop reasons are exclusive, checked in this order: ``nonfinite`` (time, mag or err not
    finite), ``out_of_range`` (finite, but |time| > ``TIME_LIMIT`` or |mag| > ``MAG_LIMIT``),
    ``nonpositive_err`` (err <= 0: its loss weight 1/err would be infinite or negative),
    ``duplicate_time`` (an exact repeat of an earlier time of the same curve; the first in input
    order is kept). ``resorted``: the curve's times were not non-decreasing and it was sorted.
    """

    n_in: np.ndarray
    nonfinite: np.ndarray
    out_of_range: np.ndarray
    nonpositive_err: np.ndarray
    duplicate_time: np.ndarray
    resorted: np.ndarray
    source_index: np.ndarray = field(repr=False)  # input flat index of every kept observation

    @property
    def dropped(self) -> np.ndarray:
        return self.nonfinite + self.out_of_range + self.nonpositive_err + self.duplicate_time

    @property
    def n_out(self) -> np.ndarray:
        return self.n_in - self.dropped

    def describe(self, i: int) -> str:
        """A short human-readable account of curve ``i`` ("" when nothing happened to it)."""
        parts = [f"{int(a[i])} {what}" for a, what in (
            (self.nonfinite, "non-finite observation(s)"),
            (self.out_of_range, f"out-of-range observation(s) (|time| > {TIME_LIMIT:.0e} days "
             f"or |mag| > {MAG_LIMIT:.0e})"),
            (self.nonpositive_err, "non-positive error(s)"),
            (self.duplicate_time, "duplicate time(s)")) if a[i]]
        text = f"dropped {', '.join(parts)}" if parts else ""
        if self.resorted[i]:
            text = f"{text}; re-sorted by time" if text else "re-sorted by time"
        return text

    def records(self) -> list[dict]:
        """One dict per curve that lost observations or was re-sorted (for cleaning logs)."""
        touched = np.flatnonzero((self.dropped > 0) | self.resorted)
        n_out = self.n_out
        return [{"curve": int(i), "n_in": int(self.n_in[i]), "n_out": int(n_out[i]),
                 "nonfinite": int(self.nonfinite[i]), "out_of_range": int(self.out_of_range[i]),
                 "nonpositive_err": int(self.nonpositive_err[i]),
                 "duplicate_time": int(self.duplicate_time[i]), "resorted": bool(self.resorted[i]),
                 "reason": self.describe(i)} for i in touched]

    def totals(self) -> dict:
        return {"curves": int(len(self.n_in)), "n_in": int(self.n_in.sum()),
                "n_out": int(self.n_out.sum()), "nonfinite": int(self.nonfinite.sum()),
                "out_of_range": int(self.out_of_range.sum()),
                "nonpositive_err": int(self.nonpositive_err.sum()),
                "duplicate_time": int(self.duplicate_time.sum()),
                "resorted": int(self.resorted.sum())}


def basic_clean(curves: Curves) -> tuple[Curves, CleanReport]:
    """Drop non-finite time/mag/err, out-of-range time/mag (``TIME_LIMIT``, ``MAG_LIMIT``),
    non-positive errors and repeated times (keeping the first in input order), and sort each
    curve by time where it was not already sorted. Returns the
    cleaned curves (same number of curves, some maybe empty; the input object itself when nothing
    changes) and a :class:`CleanReport`."""
    n = len(curves)
    cid = curves.curve_index()
    finite = np.isfinite(curves.time) & np.isfinite(curves.mag)
    positive = np.ones_like(finite)
    if curves.err is not None:
        finite &= np.isfinite(curves.err)
        positive = curves.err > 0
    in_range = (np.abs(curves.time) <= TIME_LIMIT) & (np.abs(curves.mag) <= MAG_LIMIT)
    count = lambda mask, ids=cid: np.bincount(ids[mask], minlength=n).astype(np.int64)  # noqa: E731

    idx = np.flatnonzero(finite & in_range & positive)
    t = curves.time[idx]
    c = cid[idx]
    same_curve = c[1:] == c[:-1]
    decreasing = (t[1:] < t[:-1]) & same_curve
    resorted = np.zeros(n, dtype=bool)
    resorted[c[1:][decreasing]] = True
    if decreasing.any():
        # Sort by (curve, time); the input position breaks ties, so "first" below means first in
        # the input, whatever the sort algorithm.
        order = np.lexsort((idx, t, c))
        idx, t, c = idx[order], t[order], c[order]
        same_curve = c[1:] == c[:-1]
    dup = np.zeros(len(idx), dtype=bool)
    dup[1:] = (t[1:] == t[:-1]) & same_curve
    report = CleanReport(n_in=curves.lengths.astype(np.int64), nonfinite=count(~finite),
                         out_of_range=count(finite & ~in_range),
                         nonpositive_err=count(finite & in_range & ~positive),
                         duplicate_time=count(dup, c), resorted=resorted,
                         source_index=idx[~dup])
    if len(report.source_index) == curves.n_obs and not resorted.any():
        return curves, report
    keep = report.source_index
    out = Curves(curves.time[keep], curves.mag[keep],
                 None if curves.err is None else curves.err[keep],
                 offsets_from_lengths(report.n_out))
    return out, report


def _sorted_by_curve_then_value(curve_ids, values_f32) -> np.ndarray:
    """The finite float32 ``values`` sorted by (curve, value), returned as float64: each curve's
    values become one ascending run. Rather than a two-key lexsort (slow: ~4 s for 8 M values),
    pack both keys into one uint64, curve in the high 32 bits and an order-preserving encoding of
    the float32 bits in the low 32 (flip every bit of negatives, set the sign bit of the rest), so
    a single plain ``np.sort`` does it, then decode the low half."""
    bits = np.ascontiguousarray(values_f32, dtype=np.float32).view(np.uint32)
    sign = np.uint32(0x80000000)
    enc = np.where(bits & sign, ~bits, bits | sign)
    key = (np.asarray(curve_ids, dtype=np.uint64) << np.uint64(32)) | enc.astype(np.uint64)
    key.sort()
    low = (key & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    dec = np.where(low & sign, low & ~sign, ~low)
    return dec.view(np.float32).astype(np.float64)


def _linear_percentile_sorted(sorted_vals, starts, counts, q: float) -> np.ndarray:
    """Per-segment percentile of already-sorted float64 segments, numpy's default ("linear")
    method reproduced operation for operation so the result is bit-identical to
    ``np.percentile(segment_as_float64, q)``. Segments with count 0 get NaN."""
    out = np.full(len(counts), np.nan)
    ok = counts > 0
    cnt = counts[ok]
    virtual = (cnt - 1) * (q / 100.0)          # numpy: (n - 1) * quantile, quantile = q / 100
    below = np.floor(virtual)
    gamma = virtual - below
    lo_i = starts[ok] + below.astype(np.int64)
    hi_i = starts[ok] + np.minimum(below.astype(np.int64) + 1, cnt - 1)
    a, b = sorted_vals[lo_i], sorted_vals[hi_i]
    diff = b - a
    # numpy's _lerp: a + diff*g, but b - diff*(1-g) when g >= 0.5 (monotone, exact at g = 1).
    out[ok] = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
    return out


def official_clean(curves: Curves, *, err_range=(0.0, 1.0),
                   percentiles=(1.0, 99.0)) -> tuple[Curves, np.ndarray]:
    """The cleaning of the Astromer paper (Sect. 4.1; SPEC section 1), vectorised over curves.

    1. Keep ``err_range[0] < err < err_range[1]`` (strict on both sides: ``0 < e < 1``). Skipped
       when ``curves.err`` is None. Non-finite errors and non-finite magnitudes are dropped too.
    2. On what is left of each curve, compute the ``percentiles`` of its magnitudes with numpy's
       default method ("linear": ``np.percentile(mag.astype(float64), q)``), and keep the
       observations with ``p_low <= mag <= p_high`` (inclusive bounds, compared in float64).
       Ties are kept or dropped together. Consequence of the linear method: a curve of fewer than
       ~101 points always loses its strict minimum and maximum (the 1st percentile lies strictly
       between the two smallest values), and a one-point curve keeps its point.

    Returns the cleaned curves (every input curve, some maybe empty) and ``kept_mask``, a boolean
    mask over the input's flat observations.
    """
    n = len(curves)
    cid = curves.curve_index()
    keep = np.isfinite(curves.mag)
    if curves.err is not None:
        lo_e, hi_e = err_range
        keep &= (curves.err > lo_e) & (curves.err < hi_e)  # NaN compares False: dropped
    idx = np.flatnonzero(keep)
    c = cid[idx]
    mag32 = curves.mag[idx]
    m = mag32.astype(np.float64)
    counts = np.bincount(c, minlength=n).astype(np.int64)
    starts = offsets_from_lengths(counts)[:-1]
    sorted_m = _sorted_by_curve_then_value(c, mag32)
    p_lo = _linear_percentile_sorted(sorted_m, starts, counts, percentiles[0])
    p_hi = _linear_percentile_sorted(sorted_m, starts, counts, percentiles[1])
    inside = (m >= p_lo[c]) & (m <= p_hi[c])
    kept = np.zeros(curves.n_obs, dtype=bool)
    kept[idx[inside]] = True
    return curves.keep_observations(kept), kept


def count_per_curve(curves: Curves, mask: np.ndarray) -> np.ndarray:
    """How many flat observations of each curve have ``mask`` True (e.g. ``~kept_mask`` from
    ``official_clean`` for the per-curve number dropped)."""
    return np.bincount(curves.curve_index()[np.asarray(mask, bool)],
                       minlength=len(curves)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------

def window_starts(lengths, window: int = WINDOW, mode: str = "overlap", rng=None):
    """Where each window begins: ``(curve_index int64, start int64, count int32)``, one entry per
    window, grouped by curve in curve order.

    * ``"overlap"``: the official evaluation rule. Starts ``0, W, 2W, ..., W*(n//W)`` (that is
      ``n//W + 1`` windows), each clamped to ``max(n - W, 0)``: the last window is pulled back to
      end at the curve's end and overlaps its predecessor. When ``n % W == 0`` the extra start
      ``n`` clamps to ``n - W``, so the last window is an exact duplicate of the previous one (for
      ``n == W``: two identical windows at 0). This is what the authors' code does and is kept on
      purpose; use ``"nonoverlap"`` to avoid it.
    * ``"nonoverlap"``: ``ceil(n/W)`` consecutive windows ``0, W, 2W, ...``; the last one may be
      partial (padded by ``make_windows``).
    * ``"random"``: one window per curve, ``start ~ U{0, ..., max(n - W, 0)}`` drawn from ``rng``
      (a ``numpy.random.Generator``, a seed, or None for fresh entropy).

    A curve shorter than ``W`` gives one window of ``count = n``; an empty curve gives none.
    """
    if mode not in WINDOW_MODES:
        raise ValueError(f"mode must be one of {WINDOW_MODES}, got {mode!r}")
    if window < 1:
        raise ValueError("window must be >= 1")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    curves_with_obs = np.flatnonzero(lengths > 0)
    n = lengths[curves_with_obs]
    if mode == "random":
        gen = _as_rng(rng)
        start = gen.integers(0, np.maximum(n - window, 0) + 1, dtype=np.int64) if len(n) \
            else np.zeros(0, np.int64)
        count = np.minimum(n, window)
        return curves_with_obs, start.astype(np.int64), count.astype(np.int32)

    per_curve = n // window + 1 if mode == "overlap" else -(-n // window)
    curve = np.repeat(curves_with_obs, per_curve)
    n_w = np.repeat(n, per_curve)
    # Ordinal of each window within its curve: 0, 1, 2, ...
    k = np.arange(len(curve), dtype=np.int64) - np.repeat(offsets_from_lengths(per_curve)[:-1],
                                                          per_curve)
    start = k * window
    if mode == "overlap":
        start = np.minimum(start, np.maximum(n_w - window, 0))
    count = np.minimum(n_w - start, window)
    return curve, start, count.astype(np.int32)


@dataclass
class Windows:
    """Padded windows ready for the model. Every array is C-contiguous numpy, so
    ``torch.from_numpy`` works on each directly (``as_tensors`` does that)."""

    t: np.ndarray        # (N, L) float32: time minus the window's mean valid time; 0 at padding
    m: np.ndarray        # (N, L) float32: mag minus the window's mean valid mag; 0 at padding
    err: np.ndarray | None  # (N, L) float32 raw (un-centred) errors; 0 at padding
    valid: np.ndarray    # (N, L) bool
    curve: np.ndarray    # (N,) int64: index of the source curve
    start: np.ndarray    # (N,) int64: first observation of the window within its curve
    n_valid: np.ndarray  # (N,) int32
    t_mean: np.ndarray   # (N,) float64: the mean that was subtracted from t
    m_mean: np.ndarray   # (N,) float32: the mean that was subtracted from m
    skipped_curves: np.ndarray  # int64 indices of curves with fewer than min_obs observations
    n_curves: int = 0
    window: int = WINDOW
    mode: str = "overlap"

    def __len__(self) -> int:
        return len(self.curve)

    def windows_per_curve(self) -> np.ndarray:
        return np.bincount(self.curve, minlength=self.n_curves).astype(np.int64)

    def as_tensors(self, device=None) -> dict:
        """The padded arrays as torch tensors (zero-copy on CPU)."""
        import torch

        names = ("t", "m", "err", "valid", "curve", "start", "n_valid", "t_mean", "m_mean")
        out = {}
        for k in names:
            a = getattr(self, k)
            out[k] = None if a is None else torch.from_numpy(a).to(device)
        return out


def make_windows(curves: Curves, window: int = WINDOW, mode: str = "overlap", rng=None,
                 min_obs: int = MIN_OBS) -> Windows:
    """Cut ``curves`` into windows (see ``window_starts`` for ``mode``), centre and pad them.

    Curves with fewer than ``min_obs`` observations (and empty curves, whatever ``min_obs``)
    produce no window and are listed in ``Windows.skipped_curves``. Curves are expected to be
    time-sorted and finite (``basic_clean``).
    """
    n_curves = len(curves)
    lengths = curves.lengths
    eligible = lengths >= max(int(min_obs), 1)
    skipped = np.flatnonzero(~eligible).astype(np.int64)
    curve, start, count = window_starts(np.where(eligible, lengths, 0), window, mode, rng)

    n_win = len(curve)
    t = np.zeros((n_win, window), np.float32)
    m = np.zeros((n_win, window), np.float32)
    err = None if curves.err is None else np.zeros((n_win, window), np.float32)
    valid = np.zeros((n_win, window), bool)
    t_mean = np.zeros(n_win, np.float64)
    m_mean = np.zeros(n_win, np.float32)
    pos = np.arange(window, dtype=np.int64)
    first = curves.offsets[:-1][curve] + start  # flat index of each window's first observation

    for s in range(0, n_win, _GATHER_BLOCK):
        sl = slice(s, min(s + _GATHER_BLOCK, n_win))
        cnt = count[sl].astype(np.int64)
        v = pos[None, :] < cnt[:, None]
        # Padded cells point at the window's first observation (always in bounds) and are zeroed.
        flat = first[sl, None] + np.where(v, pos[None, :], 0)
        valid[sl] = v

        # Time: centre in float64 relative to the first observation, so the sum runs over small
        # numbers; only the centred offsets are cast to float32.
        t0 = curves.time[first[sl]]
        rel = np.where(v, curves.time[flat] - t0[:, None], 0.0)
        rel_mean = rel.sum(axis=1) / cnt
        t[sl] = np.where(v, rel - rel_mean[:, None], 0.0)
        t_mean[sl] = t0 + rel_mean

        mag = np.where(v, curves.mag[flat].astype(np.float64), 0.0)
        mean = mag.sum(axis=1) / cnt
        m[sl] = np.where(v, mag - mean[:, None], 0.0)
        m_mean[sl] = mean

        if err is not None:
            err[sl] = np.where(v, curves.err[flat], np.float32(0))

    return Windows(t=t, m=m, err=err, valid=valid, curve=curve.astype(np.int64),
                   start=start.astype(np.int64), n_valid=count.astype(np.int32), t_mean=t_mean,
                   m_mean=m_mean, skipped_curves=skipped, n_curves=n_curves, window=int(window),
                   mode=mode)


# ---------------------------------------------------------------------------------------------
# Pretraining masks (SPEC section 4)
# ---------------------------------------------------------------------------------------------

@dataclass
class ProbeMasks:
    """(N, L) boolean masks; ``probed = same | random | masked`` (disjoint), all within valid."""

    probed: np.ndarray  # observations that enter the loss
    same: np.ndarray    # probed, input keeps its true magnitude
    random: np.ndarray  # probed, input gets a magnitude drawn from the same window
    masked: np.ndarray  # probed, hidden from attention and replaced by the MASK token


def probe_counts(n_valid, probed_frac: float = 0.5, same_frac: float = 0.2,
                 random_frac: float = 0.2):
    """``(n_probed, n_same, n_random, n_masked)`` per window, int64: the one definition of the
    counts, used by ``probe_masks`` (numpy) and by the training masks on the device
    (``astromer_fast.training.masking``: give a torch tensor, get tensors on its device, with no
    host round trip).

    ``n_probed = int(probed_frac * n_valid)``, ``n_same = ceil(same_frac * n_probed)``,
    ``n_random = ceil(random_frac * (n_probed - n_same))``, the rest masked. The products are
    computed in float32, as the authors' TensorFlow code does. For the default fractions this agrees
    with float64 arithmetic, but not for every fraction: with ``same_frac=0.7`` and 10 probed,
    float32 gives ``ceil(7.0) = 7`` where float64 gives ``ceil(7.000000000000001) = 8``.
    """
    if type(n_valid).__module__.startswith("torch"):
        import torch

        ops = torch

        def f32(x):
            return x.to(torch.float32)

        def i64(x):
            return x.to(torch.int64)

        def frac(v):
            return torch.tensor(v, dtype=torch.float32)
    else:
        ops, frac = np, np.float32
        n_valid = np.asarray(n_valid)

        def f32(x):
            return x.astype(np.float32)

        def i64(x):
            return x.astype(np.int64)
    n_probed = i64(ops.trunc(f32(n_valid) * frac(probed_frac)))
    n_same = ops.minimum(i64(ops.ceil(f32(n_probed) * frac(same_frac))), n_probed)
    rest = n_probed - n_same
    n_random = ops.minimum(i64(ops.ceil(f32(rest) * frac(random_frac))), rest)
    return n_probed, n_same, n_random, rest - n_random


def probe_masks(valid, rng, probed_frac: float = 0.5, same_frac: float = 0.2,
                random_frac: float = 0.2) -> ProbeMasks:
    """Choose, per window, the probed observations and split them into same / random / masked,
    with the exact counts of ``probe_counts``. The probed set is uniform among the valid
    observations: each valid cell gets a random key, padding gets a key above every valid one,
    and a row's cells are ranked by key; the first ``n_same`` ranks are "same", the next
    ``n_random`` "random", the next ``n_masked`` "masked"."""
    gen = _as_rng(rng)
    valid = np.asarray(valid, dtype=bool)
    n_rows, width = valid.shape
    n_probed, n_same, n_random, _ = probe_counts(valid.sum(axis=1), probed_frac, same_frac,
                                                 random_frac)
    keys = gen.random((n_rows, width))
    keys[~valid] = 2.0  # random() is in [0, 1): padding always ranks after every valid cell
    order = np.argsort(keys, axis=1)
    rank = np.empty((n_rows, width), dtype=np.int64)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(width), (n_rows, width)), axis=1)
    a = n_same[:, None]
    b = (n_same + n_random)[:, None]
    p = n_probed[:, None]
    return ProbeMasks(probed=rank < p, same=rank < a, random=(rank >= a) & (rank < b),
                      masked=(rank >= b) & (rank < p))


def apply_probe(m, valid, masks: ProbeMasks, rng):
    """The model inputs of a pretraining batch: ``(m_input, hidden)``.

    ``m_input`` (float32 copy of ``m``): at "random" positions, a magnitude drawn uniformly (with
    replacement) from the valid observations of the same window (the original values of ``m``,
    which may be the position's own); at hidden positions, 0, so a target can never leak into the
    input even if a caller ignores ``hidden``. ``hidden = masked | ~valid`` is the attention mask
    (the model replaces hidden magnitudes by its MASK token). ``m`` itself stays the target.
    """
    gen = _as_rng(rng)
    m = np.asarray(m)
    valid = np.asarray(valid, dtype=bool)
    m_input = np.array(m, dtype=np.float32, order="C", copy=True)
    rows, cols = np.nonzero(masks.random)
    if rows.size:
        n_valid = valid.sum(axis=1)
        pick = gen.integers(0, n_valid[rows], dtype=np.int64)  # which valid obs, 0..n_valid-1
        prefix = np.arange(valid.shape[1])[None, :] < n_valid[:, None]
        if np.array_equal(valid, prefix):  # windows from make_windows: valid cells lead the row
            src = pick
        else:  # general masks: column of the pick-th valid cell of the row
            src = np.argsort(~valid, axis=1, kind="stable")[rows, pick]
        m_input[rows, cols] = m[rows, src]
    hidden = masks.masked | ~valid
    m_input[hidden] = 0.0
    return m_input, hidden
