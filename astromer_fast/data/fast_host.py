"""The host side of embedding in C++: one pass from the Arrow buffers of a record batch to the
cleaned, centred, windowed and sorted batch buffers the model reads (``astromer_fast._C``
``host_clean`` / ``host_windows``; csrc/cpu/host_windows.h).

The numpy path (``stream.prepare_python``: ``decode_batch``, ``basic_clean``, ``make_windows``) is
the reference: this one applies the same rules in the same order and gets bit-identical outputs
(python_tests/test_host_pipeline.py compares them on every layout). ``ASTROMER_FAST_HOST=python``
selects the reference.

Observation values are read in place: the list offsets and the float32/float64 value buffers of
the nested (``list<struct>``), struct-of-lists and parallel-lists layouts, validity bitmaps and
sliced arrays included; other value types are cast to the reference's types first. Long tables and
per-observation band columns (whose curves must be regrouped) are decoded by the reference decoder
and then cleaned and windowed here. Everything per curve (ids, bands, offsets, reasons) stays in
Arrow/numpy; nothing per observation crosses into Python.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from astromer_fast.data.layouts import Layout, _as_string, _combine, _row_band, decode_batch
from astromer_fast.data.preprocess import MAG_LIMIT, TIME_LIMIT, CleanReport, offsets_from_lengths

HOST_PATHS = ("cpp", "python")
HOST_ENV = "ASTROMER_FAST_HOST"
_MODES = {"overlap": 0, "nonoverlap": 1}


def host_path() -> str:
    """The host path asked for by ``$ASTROMER_FAST_HOST``: "cpp" or "python". Unset, "cpp" where
    the compiled module imports, else "python" (a source tree without its build, as a worker
    process started in a checkout sees it): both give the same outputs, bit for bit."""
    from astromer_fast.kernels import _ext

    value = os.environ.get(HOST_ENV, "").strip().lower()
    if value and value not in HOST_PATHS:
        raise ValueError(f"{HOST_ENV} must be one of {HOST_PATHS}, got {value!r}")
    if value == "python":
        return "python"
    if _ext.cpu_ext() is not None:
        return "cpp"
    if not value:
        return "python"
    raise RuntimeError(f"{HOST_ENV}=cpp, but astromer_fast._C cannot be imported "
                       f"({_ext.cpu_ext_error()})")


class _Column:
    """One observation field as ``host_clean`` reads it: a float32/float64 Arrow array (logical
    index = list offset), the enclosing struct's validity, and each curve's first index. Holds
    the arrays so that their buffers outlive the call."""

    def __init__(self, values: pa.Array, want: pa.DataType, starts: np.ndarray, parent=None):
        if values.type not in (pa.float32(), pa.float64()):
            values = pc.cast(values, want)  # the reference's own cast, same values
        self.values, self.parent = values, parent
        self.starts = np.ascontiguousarray(starts, dtype=np.int64)

    def take(self, idx: np.ndarray) -> "_Column":
        col = object.__new__(_Column)
        col.values, col.parent, col.starts = self.values, self.parent, self.starts[idx]
        return col

    def spec(self) -> list:
        bufs = self.values.buffers()
        valid = bufs[0].address if (self.values.null_count and bufs[0] is not None) else 0
        parent_bits, parent_offset = 0, 0
        if self.parent is not None and self.parent.null_count:
            parent_bits, parent_offset = self.parent.buffers()[0].address, self.parent.offset
        return [bufs[1].address, int(self.values.type == pa.float64()), self.values.offset, valid,
                parent_bits, parent_offset, self.starts.ctypes.data]


def _list_extent(arr) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """(first value index, length) per row of a list array (a null list is empty) and the
    values those indices point into."""
    n = len(arr)
    if pa.types.is_fixed_size_list(arr.type):
        size = arr.type.list_size
        starts = (arr.offset + np.arange(n, dtype=np.int64)) * size
        lengths = np.full(n, size, np.int64)
    else:
        offsets = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        starts, lengths = offsets[:-1], np.diff(offsets)
    if arr.null_count:
        lengths = np.where(arr.is_valid().to_numpy(zero_copy_only=False), lengths, 0)
    return starts, lengths, arr.values


def _lists_of(arr, parent=None):
    """A list array whose rows are also null where ``parent`` (a struct) is null."""
    if parent is not None and parent.null_count:
        starts, lengths, values = _list_extent(arr)
        lengths = np.where(parent.is_valid().to_numpy(zero_copy_only=False), lengths, 0)
        return starts, lengths, values
    return _list_extent(arr)


def _in_place(batch, layout: Layout):
    """(ids, bands, lengths, columns, problems) read in place, or None when this layout needs
    the reference decoder (long tables, one band per observation)."""
    if layout.kind == "long" or layout.band_per_obs:
        return None
    n = batch.num_rows
    ids = _as_string(batch.column(layout.id))
    bands = _row_band(batch, layout, n)
    roles = [("time", layout.time, pa.float64()), ("mag", layout.mag, pa.float32())]
    if layout.err:
        roles.append(("err", layout.err, pa.float32()))
    if layout.kind == "nested":
        starts, lengths, struct = _list_extent(_combine(batch.column(layout.container)))
        columns = {role: _Column(struct.field(name), want, starts, parent=struct)
                   for role, name, want in roles}
        return ids, bands, lengths, columns, {}
    if layout.kind == "struct_of_lists":
        container = _combine(batch.column(layout.container))
        lists = {name: _lists_of(container.field(name), container) for _, name, _ in roles}
    else:
        lists = {name: _list_extent(_combine(batch.column(name))) for _, name, _ in roles}
    names = [name for _, name, _ in roles]
    # Rows whose parallel lists differ in length: empty, with the reference's reason.
    lens = np.stack([lists[name][1] for name in names])
    lengths = lens[0].copy()
    mismatch = (lens != lens[0]).any(axis=0)
    lengths[mismatch] = 0
    problems = {int(i): "parallel lists of different lengths (" + ", ".join(
        f"{name} {int(ln[i])}" for name, ln in zip(names, lens)) + ")"
        for i in np.flatnonzero(mismatch)}
    columns = {role: _Column(lists[name][2], want, lists[name][0]) for role, name, want in roles}
    return ids, bands, lengths, columns, problems


def _decoded(batch, layout: Layout):
    """The reference decoder's curves as columns (flat numpy arrays, no nulls)."""
    dec = decode_batch(batch, layout)
    curves = dec.curves
    starts = curves.offsets[:-1]
    columns = {"time": _Column(pa.array(curves.time), pa.float64(), starts),
               "mag": _Column(pa.array(curves.mag), pa.float32(), starts)}
    if curves.err is not None:
        columns["err"] = _Column(pa.array(curves.err), pa.float32(), starts)
    return dec.ids, dec.bands, curves.lengths, columns, dec.problems


def _empty_buffer(shape, dtype, pinned):
    return torch.empty(shape, dtype=dtype, pin_memory=pinned)


def prepare_cpp(batch, layout: Layout, *, window: int, window_mode: str, min_obs: int,
                cuda: bool = False, bands=None, timers=None):
    """``stream.prepare`` in C++: the same ``Chunk``, bit for bit."""
    from astromer_fast.embedding.device import Timers
    from astromer_fast.embedding.stream import Chunk, reject_reason
    from astromer_fast.kernels._ext import require_cpu_ext

    # Through _ext, as the kernels do: it finds the installed build even where a source checkout
    # shadows it (worker processes started in one, as Ray's are).
    _C = require_cpu_ext()

    tm = timers if timers is not None else Timers()
    t0 = time.perf_counter()
    if window_mode not in _MODES:
        raise ValueError(f"window_mode must be one of {tuple(_MODES)}, got {window_mode!r}")
    parts = _in_place(batch, layout) or _decoded(batch, layout)
    ids, band_arr, lengths, columns, problems = parts
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    n_filtered = 0
    if bands is not None:
        keep = pc.fill_null(pc.is_in(band_arr, value_set=pa.array(list(bands), pa.string())),
                            False).to_numpy(zero_copy_only=False)
        if not keep.all():
            idx = np.flatnonzero(keep)
            n_filtered = len(keep) - len(idx)
            remap = {int(j): i for i, j in enumerate(idx)}
            problems = {remap[k]: v for k, v in problems.items() if k in remap}
            ids, band_arr = ids.take(pa.array(idx)), band_arr.take(pa.array(idx))
            lengths = np.ascontiguousarray(lengths[idx])
            columns = {role: col.take(idx) for role, col in columns.items()}
    n = len(lengths)
    scratch_offsets = offsets_from_lengths(lengths)
    n_total = int(scratch_offsets[-1])
    clean_time = np.empty(n_total, np.float64)
    clean_mag = np.empty(n_total, np.float32)
    counts = np.zeros((6, n), np.int64)  # n_out, nonfinite, out_of_range, nonpositive, dup, wins
    resorted = np.zeros(n, np.uint8)
    t1 = time.perf_counter()
    n_windows = 0
    if n_total:
        none = [0] * 7
        n_windows = _C.host_clean(
            n, lengths.ctypes.data, columns["time"].spec(), columns["mag"].spec(),
            columns["err"].spec() if "err" in columns else none, TIME_LIMIT, MAG_LIMIT, window,
            min_obs, _MODES[window_mode], scratch_offsets.ctypes.data, clean_time.ctypes.data,
            clean_mag.ctypes.data, *(counts[i].ctypes.data for i in range(5)),
            resorted.ctypes.data, counts[5].ctypes.data)
    n_out, nonfinite, out_of_range, nonpositive, duplicate, per_curve = counts
    t2 = time.perf_counter()
    tensors = {"t": _empty_buffer((n_windows, window), torch.float32, cuda),
               "m": _empty_buffer((n_windows, window), torch.float32, cuda),
               "valid": _empty_buffer((n_windows, window), torch.bool, cuda),
               "curve": _empty_buffer((n_windows,), torch.int64, cuda),
               "n_valid": _empty_buffer((n_windows,), torch.int32, cuda)}
    start = np.empty(n_windows, np.int64)
    order = np.empty(n_windows, np.int64)
    if n_windows:
        _C.host_windows(n, window, _MODES[window_mode], scratch_offsets.ctypes.data,
                        clean_time.ctypes.data, clean_mag.ctypes.data, n_out.ctypes.data,
                        per_curve.ctypes.data, n_windows,
                        *(tensors[k].data_ptr() for k in ("t", "m", "valid", "curve", "n_valid")),
                        start.ctypes.data, order.ctypes.data)
    report = CleanReport(n_in=lengths, nonfinite=nonfinite, out_of_range=out_of_range,
                         nonpositive_err=nonpositive, duplicate_time=duplicate,
                         resorted=resorted.view(bool), source_index=np.zeros(0, np.int64))
    reasons = [(int(i), reject_reason(report, problems, int(i), int(n_out[i]), min_obs))
               for i in np.flatnonzero(per_curve == 0)]
    t3 = time.perf_counter()
    tm.add("decode", t1 - t0)
    tm.add("clean", t2 - t1)
    tm.add("window", t3 - t2)
    return Chunk(ids, band_arr, n_out, lengths, per_curve, reasons, tensors,
                 tensors["n_valid"].numpy(), start, order, batch.num_rows, n_filtered)
