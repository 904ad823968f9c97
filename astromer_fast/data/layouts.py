"""Light-curve table layouts found in the field, and how to turn any of them into ``Curves``.

Four layouts are understood (``detect_layout`` picks one from an Arrow schema):

``nested``
    One row per object, a ``list<struct<time, mag, magerr, ...>>`` column (the layout of
    ``../shared/data``, nested-pandas and LSDB).
``struct_of_lists``
    One row per object, a ``struct<hmjd: list, mag: list, magerr: list, ...>`` column (ZTF DR
    light-curve files).
``lists``
    One row per object, parallel top-level list columns (``hmjd: list<double>``, ``mag: list``...).
``long``
    One row per observation, scalar columns plus an id column. Rows of an object need not be in
    time order, and the rows of the objects inside one record batch may be interleaved, but
    **the file must be grouped by id** across record batches (every object's rows contiguous,
    e.g. the file sorted by id, as LSST/ZTF source tables are written per object): the reader
    carries the last object of each batch into the next one, so an object split across a batch
    boundary is handled, but an id that reappears after another object would be emitted twice.

Column names are matched case-insensitively against ``COLUMN_ALIASES`` (``hmjd``/``mjd``/
``midpointMjdTai`` for time, ``psfMag``/``magpsf`` for magnitude, ``sigmapsf``/``psfMagErr`` for the
error, ``band``/``filter``/``fid`` for the band...); explicit names override. The error column is
optional. A band column (or struct field) holding one value per observation splits each object
into one curve per band (Astromer is single-band); a band holding one value per row labels it.

Every decoder is vectorised over curves (Arrow compute + numpy; no Python loop over curves or
observations). Output curves come in input order; the bands of one object in sorted order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from astromer_fast.data.preprocess import Curves, offsets_from_lengths

LAYOUTS = ("nested", "struct_of_lists", "lists", "long")

COLUMN_ALIASES = {
    "id": ("id", "objectid", "object_id", "objid", "oid", "diaobjectid", "source_id", "sourceid",
           "sourceID", "name"),
    "time": ("time", "mjd", "hmjd", "midpointmjdtai", "midpointtai", "jd", "hjd", "bjd",
             "obs_time", "t"),
    "mag": ("mag", "magpsf", "psfmag", "mag_psf", "magnitude", "m"),
    "err": ("magerr", "mag_err", "sigmapsf", "psfmagerr", "magerr_psf", "sigmag", "sigma_mag",
            "emag", "err", "error", "e"),
    "band": ("band", "filter", "filtercode", "fid", "filtername", "passband"),
}


def _is_list(t) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_scalar_number(t) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


@dataclass
class Layout:
    """Where the columns of a light-curve table are. ``container`` is the list<struct> column
    (nested) or the struct column (struct_of_lists); field names then refer to its fields."""

    kind: str
    id: str
    time: str
    mag: str
    err: str | None = None
    band: str | None = None
    band_per_obs: bool = False  # True: one band per observation -> curves are split by band
    band_in_container: bool = False
    container: str | None = None

    def columns(self) -> list[str]:
        """The top-level columns to read."""
        cols = [self.id]
        if self.container:
            cols.append(self.container)
        if not self.container or self.kind in ("lists", "long"):
            cols += [self.time, self.mag] + ([self.err] if self.err else [])
        if self.band and not self.band_in_container:
            cols.append(self.band)
        return list(dict.fromkeys(cols))

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def _pick(names, role, explicit, where, required=True):
    """The name among ``names`` for ``role``: the explicit one (exact, else case-insensitive) or
    the first alias found. ``explicit=""`` means "none"."""
    if explicit == "":
        return None
    lower = {n.lower(): n for n in reversed(list(names))}
    if explicit is not None:
        if explicit in names:
            return explicit
        if explicit.lower() in lower:
            return lower[explicit.lower()]
        if required:
            raise ValueError(f"{where}: no column or field named {explicit!r}; found {list(names)}")
        return None
    for alias in COLUMN_ALIASES[role]:
        if alias.lower() in lower:
            return lower[alias.lower()]
    return None


def _fmt_schema(schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def detect_layout(schema: pa.Schema, where: str = "input", *, id_col=None, time_col=None,
                  mag_col=None, err_col=None, band_col=None, lightcurve_col=None,
                  layout: str | None = None) -> Layout:
    """Find the layout and the columns of ``schema`` (see the module docstring). Column arguments
    override the aliases; ``""`` for ``err_col`` / ``band_col`` means "do not use one".
    Raises ``ValueError`` naming ``where``, listing what was found, when nothing fits."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    top = {f.name: f.type for f in schema}
    names = list(top)
    tried = []

    def roles(fields: dict, want_list: bool | None):
        """(time, mag, err, band) among ``fields`` whose types fit."""
        def ok(n, numeric=True):
            if n is None:
                return None
            t = fields[n]
            if want_list is True:
                return n if _is_list(t) else None
            if want_list is False and _is_list(t):
                return None
            return n
        t = ok(_pick(fields, "time", time_col, where, required=False))
        m = ok(_pick(fields, "mag", mag_col, where, required=False))
        e = ok(_pick(fields, "err", err_col, where, required=False))
        b = _pick(fields, "band", band_col, where, required=False)
        return t, m, e, b

    def top_band(exclude=()):
        b = _pick(names, "band", band_col, where, required=False)
        return None if b in exclude else b

    id_name = _pick(names, "id", id_col, where, required=False)

    def finish(lay: Layout) -> Layout:
        if lay.id is None:
            raise ValueError(f"{where}: found {lay.kind} light curves but no id column (looked "
                             f"for {list(COLUMN_ALIASES['id'])}); columns: {_fmt_schema(schema)}. "
                             f"Name it with id_col= / --id-col")
        return lay

    # 1. nested: list<struct<...>>
    containers = [lightcurve_col] if lightcurve_col else names
    for c in containers:
        typ = top.get(c)
        if typ is None:
            if lightcurve_col:
                raise ValueError(f"{where}: missing column {lightcurve_col!r}; found "
                                 f"{_fmt_schema(schema)}")
            continue
        if layout not in (None, "nested", "struct_of_lists"):
            break
        if _is_list(typ) and pa.types.is_struct(typ.value_type) and layout in (None, "nested"):
            fields = {f.name: f.type for f in typ.value_type}
            t, m, e, b = roles(fields, want_list=False)
            tried.append(f"{c} (list<struct>) fields {sorted(fields)}")
            if t and m:
                if b:
                    return finish(Layout("nested", id_name, t, m, e, b, True, True, c))
                b = top_band((c, id_name))
                per_obs = b is not None and _is_list(top[b])
                return finish(Layout("nested", id_name, t, m, e, b, per_obs, False, c))
        if pa.types.is_struct(typ) and layout in (None, "struct_of_lists"):
            fields = {f.name: f.type for f in typ}
            t, m, e, b = roles(fields, want_list=True)
            tried.append(f"{c} (struct) fields {sorted(fields)}")
            if t and m:
                if b:
                    return finish(Layout("struct_of_lists", id_name, t, m, e, b,
                                         _is_list(fields[b]), True, c))
                b = top_band((c, id_name))
                per_obs = b is not None and _is_list(top[b])
                return finish(Layout("struct_of_lists", id_name, t, m, e, b, per_obs, False, c))

    # 2. parallel list columns
    if layout in (None, "lists"):
        t, m, e, b = roles(top, want_list=True)
        if t and m:
            per_obs = b is not None and _is_list(top[b])
            return finish(Layout("lists", id_name, t, m, e, b, per_obs, False, None))
    # 3. long: scalar columns, one row per observation
    if layout in (None, "long"):
        t, m, e, b = roles(top, want_list=False)
        if t and m and _is_scalar_number(top[t]) and _is_scalar_number(top[m]):
            if id_name is None:
                raise ValueError(f"{where}: looks like a long table (one row per observation: "
                                 f"{t}, {m}) but has no id column (looked for "
                                 f"{list(COLUMN_ALIASES['id'])}); columns: {_fmt_schema(schema)}. "
                                 f"Name it with id_col= / --id-col")
            return Layout("long", id_name, t, m, e if e and _is_scalar_number(top[e]) else None,
                          b, b is not None, False, None)
        if t and m:
            wrong = [f"{n} ({top[n]})" for n in (t, m) if not _is_scalar_number(top[n])]
            raise ValueError(f"{where}: time and magnitude must be numbers, and column(s) "
                             f"{', '.join(wrong)} are not; cast them, or name other columns "
                             f"with time_col=/mag_col= (CLI: --time-col, --mag-col)")

    want = ", ".join(f"{r} ({'/'.join(COLUMN_ALIASES[r][:4])}...)" for r in ("time", "mag"))
    extra = f"; inspected {'; '.join(tried)}" if tried else ""
    raise ValueError(
        f"{where}: cannot find light curves (missing column(s) for {want}{extra}). Found columns: "
        f"{_fmt_schema(schema)}. Understood layouts: nested list<struct<time, mag, magerr>>, "
        f"struct of lists, parallel list columns, long table (one row per observation + id). Name "
        f"the columns with id_col=/time_col=/mag_col=/err_col=/band_col=/lightcurve_col= "
        f"(CLI: --id-col, --time-col, ...)")


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

@dataclass
class DecodedCurves:
    """Curves of one record batch: ``ids``/``bands`` (Arrow string arrays, one entry per curve),
    the observations, and structural problems found while decoding (curve index -> reason; such
    curves are empty and must be rejected with that reason)."""

    ids: pa.Array
    bands: pa.Array
    curves: Curves
    problems: dict = field(default_factory=dict)
    n_rows: int = 0


def _combine(col):
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def _list_parts(arr):
    """(lengths int64, flat values Array) of a list array, honouring slices and nulls."""
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    return lengths.astype(np.int64, copy=False), arr.flatten()


def _to_float(values, dtype):
    col = pc.cast(values, pa.float64() if dtype == np.float64 else pa.float32())
    if col.null_count:
        col = pc.fill_null(col, float("nan"))
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=dtype)


def _as_string(arr):
    arr = _combine(arr)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    return arr if arr.type == pa.string() else pc.cast(arr, pa.string())


def _band_codes(bands_flat: pa.Array):
    """Per-observation band codes (int64) ranked by band value, null last, and the band names."""
    enc = pc.dictionary_encode(_as_string(bands_flat))
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    names = enc.dictionary.to_pylist()  # distinct bands: a handful
    rank = np.argsort(np.array(names, dtype=object), kind="stable") if names else np.zeros(0, int)
    remap = np.empty(len(names) + 1, np.int64)
    remap[rank] = np.arange(len(names))
    remap[len(names)] = len(names)  # null band
    codes = pc.fill_null(enc.indices, len(names)).to_numpy(zero_copy_only=False).astype(np.int64)
    return remap[codes], [names[i] for i in rank] + [None]


def _split_by_band(ids, row_lengths, band_flat, t, m, e, problems_by_row):
    """Rows of objects -> one curve per (row, band), rows in order, bands sorted; a row with no
    observation stays as one empty curve (band null) so it is reported."""
    n = len(row_lengths)
    codes, band_names = _band_codes(band_flat)
    nb = len(band_names)
    row = np.repeat(np.arange(n, dtype=np.int64), row_lengths)
    key = row * nb + codes
    order = np.argsort(key, kind="stable")
    key_s = key[order]
    uniq, counts = np.unique(key_s, return_counts=True)
    g_row, g_band = uniq // nb, uniq % nb
    empty = np.flatnonzero(row_lengths == 0)
    g_row = np.concatenate([g_row, empty])
    g_band = np.concatenate([g_band, np.full(len(empty), nb - 1)])
    counts = np.concatenate([counts, np.zeros(len(empty), np.int64)])
    g_order = np.lexsort((g_band, g_row))
    g_row, g_band, counts = g_row[g_order], g_band[g_order], counts[g_order]
    curves = Curves(t[order], m[order], None if e is None else e[order],
                    offsets_from_lengths(counts))
    out_ids = ids.take(pa.array(g_row))
    out_bands = pa.array(np.array(band_names, dtype=object)[g_band], pa.string())
    problems = {}
    if problems_by_row:
        rows = np.array(sorted(problems_by_row), np.int64)
        idx = np.searchsorted(g_row, rows)  # an empty row is exactly one group
        problems = {int(i): problems_by_row[int(r)] for i, r in zip(idx, rows)}
    return out_ids, out_bands, curves, problems


def _row_band(batch, layout, n):
    if layout.band is None:
        return pa.nulls(n, pa.string())
    if layout.band_in_container:
        col = pc.struct_field(_combine(batch.column(layout.container)), layout.band)
    else:
        col = batch.column(layout.band)
    return _as_string(col)


def decode_batch(batch, layout: Layout) -> DecodedCurves:
    """One record batch (or table) in ``layout`` -> :class:`DecodedCurves`. Null lists give empty
    curves, null values NaN (dropped by ``basic_clean``); rows whose parallel lists have different
    lengths become empty curves with a reason in ``problems``. Long tables are grouped by (id,
    band) and sorted by time (ties keep input order)."""
    n = batch.num_rows
    if layout.kind == "long":
        return _decode_long(batch, layout)
    ids = _as_string(batch.column(layout.id))
    if layout.kind == "nested":
        lengths, values = _list_parts(_combine(batch.column(layout.container)))
        t = _to_float(pc.struct_field(values, layout.time), np.float64)
        m = _to_float(pc.struct_field(values, layout.mag), np.float32)
        e = None if layout.err is None else _to_float(pc.struct_field(values, layout.err),
                                                      np.float32)
        band_flat = (pc.struct_field(values, layout.band)
                     if layout.band_per_obs and layout.band_in_container else None)
        parts = {}
    else:
        if layout.kind == "struct_of_lists":
            container = _combine(batch.column(layout.container))
            get = lambda name: pc.struct_field(container, name)  # noqa: E731
        else:
            get = lambda name: _combine(batch.column(name))  # noqa: E731
        names = [layout.time, layout.mag] + ([layout.err] if layout.err else [])
        if layout.band_per_obs and layout.band_in_container:
            names.append(layout.band)
        parts = {name: _list_parts(get(name)) for name in names}
        lens = np.stack([p[0] for p in parts.values()])
        lengths = lens[0].copy()
        mismatch = (lens != lens[0]).any(axis=0)
        flats = {}
        for name, (ln, vals) in parts.items():
            if mismatch.any():
                vals = vals.filter(pa.array(np.repeat(~mismatch, ln)))
            flats[name] = vals
        lengths[mismatch] = 0
        t = _to_float(flats[layout.time], np.float64)
        m = _to_float(flats[layout.mag], np.float32)
        e = None if layout.err is None else _to_float(flats[layout.err], np.float32)
        band_flat = flats.get(layout.band) if layout.band_in_container else None
        parts = {int(i): "parallel lists of different lengths (" + ", ".join(
            f"{name} {int(ln[i])}" for name, ln in zip(names, lens)) + ")"
            for i in np.flatnonzero(mismatch)}
    if layout.band_per_obs and band_flat is None:  # a top-level list band column
        blen, band_flat = _list_parts(_combine(batch.column(layout.band)))
        bad = blen != lengths
        if bad.any():
            raise ValueError(f"band list column {layout.band!r} does not match the light-curve "
                             f"lengths in {int(bad.sum())} row(s)")
    if layout.band_per_obs:
        out_ids, out_bands, curves, problems = _split_by_band(ids, lengths, band_flat, t, m, e,
                                                              parts)
        return DecodedCurves(out_ids, out_bands, curves, problems, n)
    curves = Curves(t, m, e, offsets_from_lengths(lengths))
    return DecodedCurves(ids, _row_band(batch, layout, n), curves, parts, n)


def _decode_long(batch, layout: Layout) -> DecodedCurves:
    n = batch.num_rows
    enc = pc.dictionary_encode(_as_string(batch.column(layout.id)))  # first-appearance order
    id_names = enc.dictionary
    id_codes = pc.fill_null(enc.indices, len(id_names)).to_numpy(zero_copy_only=False)
    id_codes = id_codes.astype(np.int64)
    if layout.band is not None:
        b_codes, band_names = _band_codes(batch.column(layout.band))
    else:
        b_codes, band_names = np.zeros(n, np.int64), [None]
    nb = len(band_names)
    key = id_codes * nb + b_codes
    t = _to_float(_combine(batch.column(layout.time)), np.float64)
    m = _to_float(_combine(batch.column(layout.mag)), np.float32)
    e = None if layout.err is None else _to_float(_combine(batch.column(layout.err)), np.float32)
    order = np.lexsort((t, key))  # stable: equal times keep input order
    uniq, counts = np.unique(key[order], return_counts=True)
    g_id, g_band = uniq // nb, uniq % nb
    id_list = pa.concat_arrays([id_names, pa.nulls(1, pa.string())])  # last code: null id
    curves = Curves(t[order], m[order], None if e is None else e[order],
                    offsets_from_lengths(counts))
    return DecodedCurves(id_list.take(pa.array(g_id)),
                         pa.array(np.array(band_names, dtype=object)[g_band], pa.string()),
                         curves, {}, n)


class NotGroupedError(ValueError):
    """A long table whose rows of one object are not contiguous."""


def iter_grouped(batches, id_col: str, where: str = "long table"):
    """Regroup the record batches of a long table (grouped by id) so that no object is split
    between two yielded tables: the trailing object of each batch is carried into the next.

    Rows must be grouped by id (any order of objects, any order within one). An id that comes
    back after its rows ended would silently become two curves, so it raises
    ``NotGroupedError`` naming the id instead (the ids already finished are remembered: memory
    grows with the number of objects, not of observations)."""
    carry = None
    done: set = set()

    def check(tbl):
        ids = pc.unique(_as_string(tbl.column(id_col))).to_pylist()
        again = [i for i in ids if i in done]
        if again:
            raise NotGroupedError(
                f"{where}: rows of object {again[0]!r} are not contiguous (it appears again after "
                f"other objects); sort or group the table by {id_col!r} first")
        done.update(ids)

    for rb in batches:
        tbl = pa.Table.from_batches([rb]) if isinstance(rb, pa.RecordBatch) else rb
        if carry is not None:
            tbl = pa.concat_tables([carry, tbl])
        if tbl.num_rows == 0:
            carry = tbl
            continue
        enc = pc.dictionary_encode(_as_string(tbl.column(id_col)))
        codes = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False)
        other = np.flatnonzero(codes != codes[-1])
        cut = int(other[-1]) + 1 if len(other) else 0
        if cut == 0:
            carry = tbl
            continue
        head = tbl.slice(0, cut)
        check(head)
        yield head
        carry = tbl.slice(cut)
    if carry is not None and carry.num_rows:
        check(carry)
        yield carry
