"""The C++ host path (astromer_fast/data/fast_host.py) against the numpy reference
(``stream.prepare_python``): the same chunks bit for bit, and the same embeddings, ids, rejects
and reasons through ``embed``, on every layout and on bad inputs."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import astromer_fast
from astromer_fast import Astromer, AstromerConfig
from astromer_fast.data.fast_host import host_path, prepare_cpp
from astromer_fast.data.layouts import detect_layout
from astromer_fast.embedding.stream import prepare, prepare_python

from test_embed import curves_table, layout_tables, survey_objects


def bad_curves(seed=0):
    """(id, band, t, m, e) curves with every kind of bad input, plus good long ones."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 1000, 450)) + 50000
    n = np.arange(450)
    out = [
        ("good", "r", t, rng.normal(18, 0.1, 450), rng.uniform(0.01, 0.1, 450)),
        ("nanmag", "r", t[:50], np.where(n[:50] < 47, np.nan, 18.0), np.full(50, 0.05)),
        ("inftime", "g", np.where(n[:50] < 46, np.inf, t[:50]), np.full(50, 18.0),
         np.full(50, 0.05)),
        ("negerr", "r", t[:50], np.full(50, 18.0), np.where(n[:50] < 48, -0.1, 0.1)),
        ("zeroerr", "r", t[:60], rng.normal(18, 0.1, 60), np.where(n[:60] % 3, 0.1, 0.0)),
        ("hugeerr", "r", t[:60], rng.normal(18, 0.1, 60), np.where(n[:60] % 4, 0.1, np.inf)),
        ("farmag", "g", t[:70], np.where(n[:70] % 5, 18.0, 1e6), np.full(70, 0.1)),
        ("fartime", "r", np.where(n[:70] % 6, t[:70], 1e9), np.full(70, 18.0), np.full(70, 0.1)),
        ("empty", "r", [], [], []),
        ("tiny", "r", t[:3], [18.0, 18.1, 18.2], [0.1, 0.1, 0.1]),
        ("five", "g", t[:5], rng.normal(18, 0.1, 5), np.full(5, 0.1)),
        ("dups", "r", np.repeat(t[:2], 10), np.full(20, 18.0), np.full(20, 0.1)),
        ("unsorted", "r", t[::-1], rng.normal(18, 0.1, 450), np.full(450, 0.05)),
        ("unsorted_dups", "g", np.concatenate([t[200:300], t[:250]]),
         rng.normal(18, 0.1, 350), np.full(350, 0.05)),
        ("exact200", "r", t[:200], rng.normal(18, 0.1, 200), np.full(200, 0.05)),
        ("exact400", "r", t[:400], rng.normal(18, 0.1, 400), np.full(400, 0.05)),
        ("negative_zero_time", "r", np.array([-0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
         np.full(7, 18.0), np.full(7, 0.1)),
    ]
    for k in range(30):  # random lengths, some unsorted, a few NaNs
        m = int(rng.integers(0, 420))
        tt = 58000 + np.round(rng.uniform(0, 1500, m), 3)
        if k % 2:
            tt = np.sort(tt)
        mm = rng.normal(15 + k * 0.1, 0.3, m)
        mm[rng.random(m) < 0.02] = np.nan
        out.append((f"rand{k}", "gr"[k % 2], tt, mm, rng.uniform(0.01, 0.2, m)))
    return out


def with_nulls(table):
    """The nested table with a null list, a null struct and null field values."""
    lc = table.column("lightcurve").combine_chunks()
    rows = lc.to_pylist()
    rows[3] = None                                   # null list
    rows[0][5] = None                                # null struct inside a list
    rows[0][7] = {**rows[0][7], "mag": None}         # null value
    rows[12][2] = {**rows[12][2], "time": None}
    return table.set_column(table.schema.get_field_index("lightcurve"), "lightcurve",
                            pa.array(rows, lc.type))


def assert_same_chunk(a, b):
    assert a.ids.equals(b.ids) and a.bands.equals(b.bands)
    for name in ("n_obs", "n_in", "windows_per_curve", "n_valid_sorted", "start", "order"):
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.reasons == b.reasons
    assert (a.n_rows, a.n_filtered) == (b.n_rows, b.n_filtered)
    for k in a.tensors:
        x, y = a.tensors[k], b.tensors[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        # Bit for bit: compare the raw bytes (NaN-safe, -0.0 distinct from 0.0).
        assert np.array_equal(x.numpy().view(np.uint8), y.numpy().view(np.uint8)), k


def both(batch, where="t", **kw):
    layout = detect_layout(batch.schema, where)
    opts = dict(window=200, min_obs=5, **kw)
    return prepare_python(batch, layout, **opts), prepare_cpp(batch, layout, **opts)


def variants():
    objs = survey_objects(n_obj=10)
    tables = layout_tables(objs)
    bad = curves_table(bad_curves())
    tables["bad"] = bad
    tables["bad_nulls"] = with_nulls(bad)
    tables["bad_sliced"] = with_nulls(bad).slice(3, 30)
    # Time as float32, magnitude as float64 and integers: cast as the reference casts them.
    lc = bad.column("lightcurve").combine_chunks()
    typ = pa.list_(pa.struct([("time", pa.float32()), ("mag", pa.float64()),
                              ("magerr", pa.float64())]))
    tables["bad_other_types"] = bad.set_column(2, "lightcurve", lc.cast(typ))
    typ = pa.large_list(pa.struct([("time", pa.int64()), ("mag", pa.float32())]))
    ints = pa.array([[{"time": int(o["time"]) if np.isfinite(o["time"]) else None,
                       "mag": o["mag"]} for o in (r or [])]
                     for r in lc.to_pylist()], typ)
    tables["int_time_large_list"] = bad.set_column(2, "lightcurve", ints)
    fixed = pa.table({"id": [f"f{i}" for i in range(6)],
                      "lightcurve": pa.FixedSizeListArray.from_arrays(
                          pa.StructArray.from_arrays(
                              [pa.array(np.tile(np.arange(30.0), 6) + 5e4),
                               pa.array(np.random.default_rng(1).normal(18, 1, 180),
                                        pa.float32())], ["time", "mag"]), 30)}).slice(1, 4)
    tables["fixed_size_sliced"] = fixed
    lists = tables["lists"]
    tables["lists_sliced_mismatch"] = pa.table({
        "id": ["a", "b", "c", "d"],
        "mjd": [list(np.arange(50.0)), None, list(np.arange(50.0)), list(np.arange(9.0))],
        "mag": [list(np.linspace(17, 18, 50)), [1.0], list(np.linspace(17, 18, 49)),
                list(np.linspace(17, 18, 9))]}).slice(1, 3)
    sol = tables["struct_of_lists"]
    col = sol.column("lightcurve").combine_chunks()
    rows = col.to_pylist()
    rows[1] = None  # a null struct row
    tables["struct_of_lists_null"] = sol.set_column(2, "lightcurve", pa.array(rows, col.type))
    tables["lists"] = lists
    return tables


@pytest.mark.parametrize("name", list(variants()))
@pytest.mark.parametrize("mode", ["overlap", "nonoverlap"])
def test_cpp_chunks_equal_the_reference_bit_for_bit(name, mode):
    table = variants()[name]
    for batch in table.to_batches(max_chunksize=17) + [table]:
        assert_same_chunk(*both(batch, name, window_mode=mode))


def test_band_filter_min_obs_and_short_windows_match():
    table = curves_table(bad_curves(1))
    layout = detect_layout(table.schema, "t")
    for opts in (dict(window=200, window_mode="overlap", min_obs=5, bands=["g"]),
                 dict(window=16, window_mode="nonoverlap", min_obs=1),
                 dict(window=7, window_mode="overlap", min_obs=30, bands=["r", "x"])):
        assert_same_chunk(prepare_python(table, layout, **opts), prepare_cpp(table, layout, **opts))


def test_an_all_empty_batch_and_an_empty_table():
    empty = curves_table([("a", "r", [], [], []), ("b", "g", [], [], [])])
    layout = detect_layout(empty.schema, "t")
    opts = dict(window=200, window_mode="overlap", min_obs=5)
    assert_same_chunk(prepare_python(empty, layout, **opts), prepare_cpp(empty, layout, **opts))
    none = empty.slice(0, 0)
    assert_same_chunk(prepare_python(none, layout, **opts), prepare_cpp(none, layout, **opts))


def test_host_path_switch(monkeypatch):
    monkeypatch.delenv("ASTROMER_FAST_HOST", raising=False)
    assert host_path() == "cpp"
    monkeypatch.setenv("ASTROMER_FAST_HOST", "python")
    assert host_path() == "python"
    monkeypatch.setenv("ASTROMER_FAST_HOST", "fortran")
    with pytest.raises(ValueError, match="ASTROMER_FAST_HOST"):
        prepare(curves_table(bad_curves()), None, window=200, window_mode="overlap", min_obs=5)


def test_host_path_without_the_compiled_module(monkeypatch):
    from astromer_fast.kernels import _ext

    monkeypatch.setattr(_ext, "cpu_ext", lambda: None)
    monkeypatch.setattr(_ext, "cpu_ext_error", lambda: ImportError("no _C here"))
    monkeypatch.delenv("ASTROMER_FAST_HOST", raising=False)
    assert host_path() == "python"  # the reference: same outputs
    monkeypatch.setenv("ASTROMER_FAST_HOST", "cpp")
    with pytest.raises(RuntimeError, match="no _C here"):
        host_path()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    Astromer(AstromerConfig(n_blocks=1, d_model=16, n_heads=1)).save_pretrained(d)
    return d


@pytest.mark.parametrize("name", ["nested", "nested_band_field", "struct_of_lists", "lists",
                                  "long", "bad_nulls"])
def test_embed_through_both_host_paths_gives_identical_files(name, model_dir, tmp_path,
                                                             monkeypatch):
    table = variants()[name]
    src = tmp_path / f"{name}.parquet"
    pq.write_table(table, src, row_group_size=9)
    outs = {}
    for path in ("python", "cpp"):
        monkeypatch.setenv("ASTROMER_FAST_HOST", path)
        outs[path] = astromer_fast.embed(src, model=model_dir, device="cpu", progress=False,
                                         return_rejects=True, read_batch_rows=7,
                                         long_batch_rows=50, precision="fp32")
    (e1, r1), (e2, r2) = outs["python"], outs["cpp"]
    assert e1.num_rows > 0 and r1.num_rows > 0 or name != "bad_nulls"
    assert e1.equals(e2) and r1.equals(r2)
