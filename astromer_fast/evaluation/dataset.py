"""A labelled light-curve dataset for the evaluation: curves (one per row: object × band), their
labels and train/test split, grouped into samples (one curve, or one curve per band of an object
when bands are concatenated)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

CLEANINGS = ("official", "basic")


@dataclass
class LabelledSet:
    """``curves``: cleaned ``Curves``, one per kept row; ``keys[i]`` = "id|band" of curve ``i``.
    ``rows``: (S, n_bands) curve indices of each sample (one column unless bands are
    concatenated); ``labels``/``is_test``/``sample_ids``: per sample."""

    curves: object
    keys: list
    rows: np.ndarray
    labels: np.ndarray
    is_test: np.ndarray
    sample_ids: np.ndarray
    bands: list
    concat: bool
    split_source: str
    notes: list = field(default_factory=list)
    raw: object = None       # the same curves before cleaning (finetuning cleans by itself)
    cleaning: str = "official"

    @property
    def classes(self) -> np.ndarray:
        return np.unique(self.labels)

    def counts(self) -> dict:
        out = {}
        for name, mask in (("train", ~self.is_test), ("test", self.is_test)):
            lab, cnt = np.unique(self.labels[mask], return_counts=True)
            out[name] = dict(zip(lab.tolist(), cnt.tolist()))
        return out


def _read(source, columns=None) -> pa.Table:
    if isinstance(source, pa.Table):
        return source
    return pq.read_table(source)


def clean_curves(curves, cleaning: str = "official"):
    """``basic_clean`` (non-finite, non-positive errors, repeated times, sorting) and, for
    ``"official"``, the paper's cleaning (0 < err < 1, 1st..99th magnitude percentiles)."""
    from astromer_fast.data import basic_clean, official_clean

    if cleaning not in CLEANINGS:
        raise ValueError(f"cleaning must be one of {CLEANINGS}, got {cleaning!r}")
    curves, _ = basic_clean(curves)
    if cleaning == "official":
        curves, _ = official_clean(curves)
    return curves


def load_labelled(source, label_col: str = "label", *, split_col: str | None = "split",
                  train_value: str = "train", test_value: str = "test", bands=None,
                  concat_bands: bool = False, id_col: str | None = None,
                  band_col: str | None = None, cleaning: str = "official", min_obs: int = 5,
                  test_fraction: float = 0.25, seed: int = 0, **layout_kw) -> LabelledSet:
    """Read a table with one row per light curve (object × band) and a label column.

    Layouts with one curve per row are accepted (nested list<struct>, struct of lists, parallel
    lists; names found by ``astromer_fast.data.layouts``). Rows without a label, and curves with
    fewer than ``min_obs`` observations after cleaning, are left out (counted in ``notes``).
    ``split_col``: rows equal to ``train_value`` train, ``test_value`` test (others are left out);
    when the column is absent (or ``split_col=None``) a stratified split by object holds out
    ``test_fraction`` of each class. ``concat_bands``: one sample per object holding one curve of
    each of ``bands`` (objects lacking one are left out); otherwise every curve is a sample.
    """
    from astromer_fast.data.layouts import decode_batch, detect_layout

    table = _read(source)
    where = "input table" if isinstance(source, pa.Table) else str(source)
    if label_col not in table.column_names:
        raise ValueError(f"{where}: no label column {label_col!r}; columns: {table.column_names}")
    layout = detect_layout(table.schema, str(where), id_col=id_col, band_col=band_col,
                           **layout_kw)
    if layout.kind == "long" or layout.band_per_obs:
        raise ValueError(f"{where}: evaluation needs one row per light curve (object × band) "
                         f"with its label; this table is a {layout.kind} layout"
                         f"{' with one band per observation' if layout.band_per_obs else ''}. "
                         f"Convert it first (one row per curve)")
    notes = []
    n_rows = table.num_rows
    labels = table[label_col]
    keep = pc.is_valid(labels).to_numpy(zero_copy_only=False)
    if (~keep).sum():
        notes.append(f"{int((~keep).sum())} row(s) without a label left out")
    has_split = split_col is not None and split_col in table.column_names
    split = (table[split_col].cast(pa.string()).to_numpy(zero_copy_only=False) if has_split
             else None)
    if has_split and not (split[keep].astype(str) == test_value).any():
        # e.g. split == "all": the column says nothing about a test set; split ourselves.
        notes.append(f"column {split_col!r} holds no {test_value!r} row among the labelled ones: "
                     f"ignored")
        has_split, split = False, None
    if has_split:
        in_split = np.isin(split.astype(str), [train_value, test_value])
        if (keep & ~in_split).sum():
            notes.append(f"{int((keep & ~in_split).sum())} labelled row(s) with {split_col} "
                         f"neither {train_value!r} nor {test_value!r} left out")
        keep &= in_split
    dec = decode_batch(table, layout)
    band_arr = np.array(["" if b is None else str(b) for b in dec.bands.to_pylist()], dtype=object)
    if bands is not None:
        bands = [bands] if isinstance(bands, str) else list(bands)
        keep &= np.isin(band_arr, bands)
    ids = np.array([str(i) for i in dec.ids.to_pylist()], dtype=object)
    label_arr = np.array([str(v) for v in labels.cast(pa.string()).to_pylist()], dtype=object)

    raw = dec.curves
    curves = clean_curves(raw, cleaning)
    short = keep & (curves.lengths < max(min_obs, 1))
    if short.sum():
        notes.append(f"{int(short.sum())} curve(s) with fewer than {min_obs} observations after "
                     f"{cleaning} cleaning left out")
    keep &= ~short
    idx = np.flatnonzero(keep)
    curves, raw = curves.take(idx), raw.take(idx)
    ids, band_arr, label_arr = ids[idx], band_arr[idx], label_arr[idx]
    split = split[idx] if has_split else None
    keys, seen = [], {}
    for i, b in zip(ids, band_arr):
        k = f"{i}|{b}"
        seen[k] = seen.get(k, 0) + 1
        # A repeated (id, band) is a second curve of the object (another source or season):
        # kept as its own sample, with a key that stays stable for the embedding cache.
        keys.append(k if seen[k] == 1 else f"{k}#{seen[k]}")
    n_dup = sum(v - 1 for v in seen.values())
    if n_dup:
        extra = " (bands concatenated: the first of each is used)" if concat_bands else ""
        notes.append(f"{n_dup} repeated (id, band) curve(s) kept as separate samples{extra}")

    present = sorted(set(band_arr.tolist()))
    use_bands = bands if bands is not None else present
    if concat_bands and len(use_bands) > 1:
        by_obj: dict = {}
        for j, (i, b) in enumerate(zip(ids, band_arr)):
            by_obj.setdefault(i, {}).setdefault(b, j)
        objs = [o for o, d in by_obj.items() if all(b in d for b in use_bands)]
        lost = len(by_obj) - len(objs)
        if lost:
            notes.append(f"{lost} object(s) lacking one of the bands {use_bands} left out")
        rows = np.array([[by_obj[o][b] for b in use_bands] for o in objs], dtype=np.int64)
        rows = rows.reshape(len(objs), len(use_bands))
        lab = label_arr[rows]
        if (lab != lab[:, :1]).any():
            raise ValueError(f"{where}: some objects have different labels in different bands")
        sample_ids = np.array(objs, dtype=object)
        concat = True
    else:
        rows = np.arange(len(keys), dtype=np.int64)[:, None]
        sample_ids = ids
        concat = False
    s_labels = label_arr[rows[:, 0]]
    if has_split:
        is_test = split[rows[:, 0]].astype(str) == test_value
        if concat and (split[rows].astype(str) != split[rows[:, :1]].astype(str)).any():
            raise ValueError(f"{where}: some objects are in different splits in different bands")
        split_source = f"column {split_col!r} ({train_value!r} / {test_value!r})"
    else:
        from astromer_fast.evaluation.protocol import stratified_split

        is_test = stratified_split(s_labels, sample_ids, test_fraction, seed)
        split_source = (f"stratified random split by object ({test_fraction:.0%} test, "
                        f"seed {seed}): no split column")
    if n_rows and not len(rows):
        raise ValueError(f"{where}: no labelled curve left (see: {'; '.join(notes) or 'bands'})")
    return LabelledSet(curves, keys, rows, s_labels, is_test, sample_ids, list(use_bands),
                       concat, split_source, notes, raw, cleaning)
