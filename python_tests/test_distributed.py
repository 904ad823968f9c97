"""Ray and Dask/LSDB engines give exactly the single-process embeddings and rejects.

One small random-init model and one input file: real EROS-1 curves with real ZTF SN Ia curves
(short, so some are rejected) from ../shared/data, or generated curves when it is absent. The
file's row groups (300 rows) do not line up with the record batches (250 rows), so units of work
must cut row groups as ``embed`` does. One Ray cluster and one Dask cluster (two workers each)
serve all the tests of their class.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shared_data_dir

import astromer_fast
from astromer_fast.cli import main as cli_main
from astromer_fast.distributed import split_rejects
from astromer_fast.distributed._core import embed_table, plan_file
from astromer_fast.embedding.columns import Columns
from astromer_fast.embedding.embed import BatchEmbedder

READ_ROWS = 250
STEM = "curves"


def _generated(n=2000, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        size = int(rng.integers(1, 8)) if k % 6 == 0 else int(rng.integers(20, 320))
        t = np.sort(50000 + rng.uniform(0, 1000, size))
        m = rng.normal(17, 0.3, size).astype(np.float32)
        if k % 10 == 0:
            m[0] = np.nan
        e = rng.uniform(0.01, 0.1, size).astype(np.float32)
        rows.append([{"time": float(a), "mag": float(b), "magerr": float(c)}
                     for a, b, c in zip(t, m, e)])
    typ = pa.list_(pa.struct([("time", pa.float64()), ("mag", pa.float32()),
                              ("magerr", pa.float32())]))
    return pa.table({"id": [f"gen{k // 2}" for k in range(n)],
                     "band": ["g" if k % 2 == 0 else "r" for k in range(n)],
                     "label": [None] * n, "lightcurve": pa.array(rows, typ)})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = shared_data_dir()
    if (d / "eros1.parquet").is_file() and (d / "ztf_snia.parquet").is_file():
        eros = pq.read_table(d / "eros1.parquet").slice(0, 1500)
        ztf = pq.read_table(d / "ztf_snia.parquet").slice(0, 500)
        table = pa.concat_tables([eros, ztf.cast(eros.schema)])
    else:  # the same checks on generated curves
        table = _generated()
    path = tmp_path_factory.mktemp("in") / f"{STEM}.parquet"
    pq.write_table(table, path, row_group_size=300)
    return path


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir)  # (also passed on command lines)


@pytest.fixture(scope="module")
def reference(data, model_dir, tmp_path_factory):
    """The single-process run: the output every engine must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    summary = astromer_fast.embed(data, out, model=model_dir, read_batch_rows=READ_ROWS,
                                  progress=False)
    assert summary.embedded > 1000 and summary.rejected > 0, summary
    return out


def assert_same_files(out_dir, ref_dir):
    for name in (f"{STEM}.parquet", f"{STEM}.rejects.parquet"):
        a, b = pq.read_table(Path(out_dir) / name), pq.read_table(Path(ref_dir) / name)
        assert a.schema.equals(b.schema, check_metadata=True), name
        assert a["id"].to_pylist() == b["id"].to_pylist(), name
        assert a.equals(b), name  # every value, the float32 embeddings bit for bit
    assert not list(Path(out_dir).glob("*.tmp"))


def assert_same_tables(combined: pa.Table, ref_dir):
    """A combined table (embeddings + rejects rows) holds exactly the reference's rows."""
    emb, rej = split_rejects(combined)
    a = pq.read_table(Path(ref_dir) / f"{STEM}.parquet")
    b = pq.read_table(Path(ref_dir) / f"{STEM}.rejects.parquet")
    assert emb["id"].to_pylist() == a["id"].to_pylist()
    assert emb.cast(a.schema).equals(a)
    assert rej.equals(b)


# ---------------------------------------------------------------------------------------------
# Without an engine
# ---------------------------------------------------------------------------------------------

def test_core_imports_no_engine():
    code = ("import sys, astromer_fast, astromer_fast.cli, astromer_fast.distributed\n"
            "bad = [m for m in ('ray', 'dask', 'distributed', 'lsdb') if m in sys.modules]\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_units_follow_embeds_record_batches(data):
    """Units cut the file on the grid ``embed``'s reader yields (across row groups), and a unit
    reads the same rows back."""
    pf = pq.ParquetFile(data)
    sizes = [b.num_rows for b in pf.iter_batches(batch_size=READ_ROWS)]
    tasks = plan_file(0, data, READ_ROWS, 3, Columns())
    ranges = [r for t in tasks for r in t.ranges]
    assert [b - a for a, b in ranges] == sizes
    assert ranges[0][0] == 0 and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
    full = pq.read_table(data)
    for t in tasks:
        part = pf.read_row_groups(list(t.row_groups))
        for a, b in t.ranges:
            got, want = part.slice(a - t.first_row, b - a), full.slice(a, b - a)
            assert repr(got.to_pylist()) == repr(want.to_pylist())  # NaN magnitudes too


def test_other_batches_same_curves_within_rounding(data, model_dir, reference, tmp_path):
    """Why the engines cut embed's own batches: a curve's vector may move by a float32 rounding
    step when other curves share its batch (the batch is padded to its longest window, and a
    short window's sums then add up in another order), so only the same batches are bit-exact.
    Everything else is equal: ids, rejects, and the vectors to rounding."""
    astromer_fast.embed(data, tmp_path, model=model_dir, read_batch_rows=97, batch_size=32,
                        progress=False)
    for name in (f"{STEM}.parquet", f"{STEM}.rejects.parquet"):
        a, b = pq.read_table(tmp_path / name), pq.read_table(Path(reference) / name)
        assert a.drop_columns(["embedding"] if "embedding" in a.column_names else []).equals(
            b.drop_columns(["embedding"] if "embedding" in b.column_names else []))
    np.testing.assert_allclose(vectors(tmp_path), vectors(reference), rtol=1e-5, atol=1e-6)


def vectors(out_dir) -> np.ndarray:
    col = pq.read_table(Path(out_dir) / f"{STEM}.parquet")["embedding"].combine_chunks()
    return np.asarray(col.flatten()).reshape(len(col), -1)


def test_combined_table_round_trip(data, model_dir, reference):
    be = BatchEmbedder(model_dir)
    combined = embed_table(be, pq.read_table(data), READ_ROWS)
    # One row per input curve, in input order, embedded or rejected.
    assert combined["id"].to_pylist() == pq.read_table(data, columns=["id"])["id"].to_pylist()
    assert_same_tables(combined, reference)


def test_combined_table_per_window(data, model_dir):
    table = pq.read_table(data).slice(1400, 300)  # EROS and ZTF curves: windows and rejects
    ref, ref_rej = astromer_fast.embed(table, model=model_dir, per_window=True,
                                       return_rejects=True, progress=False)
    emb, rej = split_rejects(embed_table(BatchEmbedder(model_dir, per_window=True), table,
                                         READ_ROWS))
    assert emb.cast(ref.schema).equals(ref) and rej.equals(ref_rej)


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------

class TestRay:
    @pytest.fixture(scope="class")
    def ray(self):
        ray = pytest.importorskip("ray", reason="Ray is not installed: pip install "
                                  "'astromer-fast[ray]'")
        pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install "
                            "'ray[data]'")
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
                 log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        yield ray
        ray.shutdown()

    def test_embed_files_two_actors(self, ray, data, model_dir, reference, tmp_path):
        from astromer_fast.distributed.ray import embed_files

        summary = embed_files(data, tmp_path, model=model_dir, actors=2,
                              read_batch_rows=READ_ROWS, batches_per_task=2, progress=False)
        assert len(summary.workers) == 2 and summary.tasks == 4, summary.workers
        assert not summary.failed and summary.rejected > 0
        assert_same_files(tmp_path, reference)

    def test_ray_data_map_batches(self, ray, data, model_dir, reference):
        from ray.data import ActorPoolStrategy

        from astromer_fast.distributed.ray import RayEmbedder

        # Two blocks of 1000 rows, one per actor: each starts on embed's batch grid, so Ray
        # Data's batches of READ_ROWS rows are embed's batches.
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ds = ray.data.read_parquet(str(data)).repartition(2).map_batches(
            RayEmbedder, fn_constructor_kwargs={"model": model_dir}, batch_format="pyarrow",
            batch_size=READ_ROWS, num_cpus=0.5, compute=ActorPoolStrategy(size=2))
        combined = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        assert_same_tables(combined, reference)

    def test_actor_killed_mid_run(self, ray, data, model_dir, reference, tmp_path):
        """An actor dies (os._exit) after embedding part of a unit: Ray restarts it, reruns the
        unit, and the files are complete and unchanged."""
        from astromer_fast.distributed.ray import embed_files

        marker = tmp_path / "crashed"
        out = tmp_path / "out"
        summary = embed_files(data, out, model=model_dir, actors=2, read_batch_rows=READ_ROWS,
                              batches_per_task=2, max_restarts=2, max_task_retries=2,
                              progress=False, _crash_once_marker=str(marker))
        assert marker.is_file(), "no actor was killed"
        assert not summary.failed
        assert_same_files(out, reference)

    def test_cli_engine_ray(self, ray, data, model_dir, reference, tmp_path, capsys):
        bad = tmp_path / "in" / "broken.parquet"
        bad.parent.mkdir()
        bad.write_bytes(b"PAR1 this is not a Parquet file")
        out = tmp_path / "out"
        rc = cli_main(["embed", str(data), str(bad), "-o", str(out), "--model", model_dir,
                       "--engine", "ray", "--actors", "2", "--read-rows", str(READ_ROWS), "-q",
                       "--continue-on-error"])
        assert rc == 1 and "broken.parquet" in capsys.readouterr().err
        assert_same_files(out, reference)
        assert not (out / "broken.parquet").exists()
        # Options that need the Ray engine, and actors that cannot fit: errors, not hangs.
        assert cli_main(["embed", str(data), "-o", str(out), "--actors", "2"]) == 2
        assert cli_main(["embed", str(data), "-o", str(out), "--engine", "ray",
                         "--actors", "5", "--model", model_dir, "-q"]) == 2
        assert "do not fit" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Dask and LSDB
# ---------------------------------------------------------------------------------------------

class TestDask:
    @pytest.fixture(scope="class")
    def client(self):
        pytest.importorskip("dask.dataframe", reason="Dask is not installed: pip install "
                            "'astromer-fast[dask]'")
        distributed = pytest.importorskip("distributed", reason="dask.distributed is not "
                                          "installed: pip install 'astromer-fast[dask]'")
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=":0") as cluster, \
                distributed.Client(cluster) as client:
            yield client

    @pytest.fixture(scope="class")
    def frame(self, data):
        import pandas as pd

        return pq.read_table(data).to_pandas(types_mapper=pd.ArrowDtype)

    def test_embed_files_two_workers(self, client, data, model_dir, reference, tmp_path):
        from astromer_fast.distributed.dask import embed_files

        summary = embed_files(data, tmp_path, client=client, model=model_dir,
                              read_batch_rows=READ_ROWS, batches_per_task=2, progress=False)
        assert len(summary.workers) == 2 and summary.tasks == 4, summary.workers
        assert_same_files(tmp_path, reference)

    def test_map_partitions(self, client, frame, model_dir, reference):
        import dask.dataframe as dd

        from astromer_fast.distributed.dask import embed_dataframe

        # Partitions start on embed's batch grid: the same batches, the same bits.
        ddf = dd.from_pandas(frame, chunksize=2 * READ_ROWS, sort=False)
        assert ddf.npartitions > 2
        assert all(n % READ_ROWS == 0 for n in ddf.map_partitions(len).compute()[:-1])
        out = embed_dataframe(ddf, model=model_dir, carry=["label"],
                              read_batch_rows=READ_ROWS).compute()
        assert out.index.equals(frame.index)  # one curve per row here: the input's index
        assert (out["label"].isna() == frame["label"].isna()).all()
        assert_same_tables(pa.Table.from_pandas(out.drop(columns=["label"]),
                                                preserve_index=False), reference)

    def test_nested_pandas_partition(self, data, model_dir, reference):
        npd = pytest.importorskip("nested_pandas", reason="nested-pandas is not installed "
                                  "(pip install 'astromer-fast[lsdb]')")
        from astromer_fast.distributed.dask import embed_partition

        nf = npd.read_parquet(str(data))
        out = embed_partition(nf, model=model_dir, read_batch_rows=READ_ROWS)
        assert isinstance(out, npd.NestedFrame) and out.index.equals(nf.index)
        assert_same_tables(pa.Table.from_pandas(out, preserve_index=False), reference)

    def test_worker_killed_mid_run(self, client, frame, model_dir, reference, tmp_path):
        """A worker process dies in a partition: its nanny restarts it, the scheduler reruns
        the partition, and the result is complete and unchanged."""
        import dask.dataframe as dd

        from astromer_fast.distributed.dask import embed_dataframe

        marker = tmp_path / "crashed"
        ddf = dd.from_pandas(frame, chunksize=2 * READ_ROWS, sort=False)
        out = embed_dataframe(ddf, model=model_dir, read_batch_rows=READ_ROWS,
                              _crash_once_marker=str(marker)).compute()
        assert marker.is_file(), "no worker was killed"
        assert_same_tables(pa.Table.from_pandas(out, preserve_index=False), reference)

    def test_lsdb_catalog(self, client, frame, model_dir, reference):
        lsdb = pytest.importorskip("lsdb", reason="LSDB is not installed: pip install "
                                   "'astromer-fast[lsdb]'")
        import dask
        from astromer_fast.distributed.dask import embed_catalog

        df = frame.iloc[1000:].copy()  # long EROS and short ZTF curves (rejects)
        # One made-up position per object (the curves' files carry none).
        ids = df["id"].astype(str).to_numpy()
        uniq, inv = np.unique(ids, return_inverse=True)
        rng = np.random.default_rng(0)
        df["ra"] = rng.uniform(0, 360, len(uniq))[inv]
        df["dec"] = np.degrees(np.arcsin(rng.uniform(-1, 1, len(uniq))))[inv]
        cat = lsdb.from_dataframe(df, ra_column="ra", dec_column="dec", partition_rows=300,
                                  should_generate_moc=False, margin_threshold=None)
        assert cat.npartitions > 2
        emb = embed_catalog(cat, model=model_dir, read_batch_rows=READ_ROWS)
        assert isinstance(emb, lsdb.catalog.Catalog)
        assert emb.get_healpix_pixels() == cat.get_healpix_pixels()
        out, src = emb.compute(), cat.compute()
        assert out.index.name == src.index.name and out.index.equals(src.index)
        assert np.array_equal(out["ra"].to_numpy(), src["ra"].to_numpy())
        # Bit for bit: the single process on the same partitions (a catalogue on disk is one
        # Parquet file per partition, which embed() cuts the same way).
        tables = [pa.Table.from_pandas(p, preserve_index=False)
                  for p in dask.compute(*cat.to_delayed())]
        refs = [astromer_fast.embed(t, model=model_dir, read_batch_rows=READ_ROWS,
                                    return_rejects=True, progress=False) for t in tables]
        emb_t, rej_t = split_rejects(pa.Table.from_pandas(out.drop(columns=["ra", "dec"]),
                                                          preserve_index=False))
        ref_emb = pa.concat_tables([r[0] for r in refs])
        assert emb_t.cast(ref_emb.schema).equals(ref_emb)
        assert rej_t.equals(pa.concat_tables([r[1] for r in refs]))
        # Against the run on the whole file: the same curves and rejects; the vectors to
        # rounding, as the partitions put other neighbours in the batches.
        key = lambda t: sorted(zip(t["id"].to_pylist(), t["band"].to_pylist()))  # noqa: E731
        mine = set(zip(df["id"].astype(str), df["band"].astype(str)))

        def ref_rows(name):  # the reference rows of the curves in this catalogue
            t = pq.read_table(Path(reference) / name)
            return t.filter(pa.array([k in mine for k in zip(t["id"].to_pylist(),
                                                             t["band"].to_pylist())]))

        ref, ref_rej = ref_rows(f"{STEM}.parquet"), ref_rows(f"{STEM}.rejects.parquet")
        assert key(emb_t) == key(ref) and key(rej_t) == key(ref_rej)
        a = dict(zip(zip(emb_t["id"].to_pylist(), emb_t["band"].to_pylist()),
                     emb_t["embedding"].to_pylist()))
        b = dict(zip(zip(ref["id"].to_pylist(), ref["band"].to_pylist()),
                     ref["embedding"].to_pylist()))
        np.testing.assert_allclose(np.array([a[k] for k in b]), np.array(list(b.values())),
                                   rtol=1e-5, atol=1e-6)


def test_engine_modules_say_how_to_install(monkeypatch):
    """Without the extras, the engine modules fail with the pip line (the core never needs them)."""
    import importlib

    for engine, mod in (("ray", "astromer_fast.distributed.ray"),
                        ("dask", "astromer_fast.distributed.dask")):
        monkeypatch.setitem(sys.modules, engine, None)  # import of it now raises ImportError
        monkeypatch.delitem(sys.modules, mod, raising=False)
        with pytest.raises(ImportError, match=rf"astromer-fast\[{engine}\]"):
            importlib.import_module(mod)
        monkeypatch.undo()
