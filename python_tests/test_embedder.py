"""``astromer_fast.Embedder``: numpy arrays in, numpy out, with the results of ``embed``.

The equality tests read the curves of a file, hand them to ``Embedder.many`` as arrays, and
compare with ``embed`` on the file, row by row matched on (id, band): the shipped MACHO sample
with the packaged model, and EROS-1 (real data, skipped when absent) with a small random model
on every curve and the packaged model on a slice.
"""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from astromer_fast import Columns, Embedder, embed
from astromer_fast.data import Curves, sample_path


def curves_of(table: pa.Table) -> list:
    """(t, m, err) arrays per row of a shared-layout table (id, band, lightcurve)."""
    curves = Curves.from_arrow(table)
    return [curves.curve(i) for i in range(len(curves))]


def assert_same_as_embed(emb: Embedder, source, table: pa.Table, **embed_kw):
    expected, rejects = embed(source, model=emb.model, device="cpu", progress=False,
                              return_rejects=True, window_mode=emb.window_mode, **embed_kw)
    got = emb.many(curves_of(table), on_reject="nan")
    keys = list(zip(table["id"].to_pylist(), table["band"].to_pylist()))
    row_of = {k: i for i, k in enumerate(keys)}
    rows = [row_of[k] for k in zip(expected["id"].to_pylist(), expected["band"].to_pylist())]
    want = np.asarray(expected["embedding"].to_pylist(), np.float32)
    np.testing.assert_allclose(got[rows], want, rtol=1e-5, atol=1e-6)
    # The curves embed rejects are exactly those Embedder cannot embed.
    rejected = sorted(row_of[k] for k in zip(rejects["id"].to_pylist(),
                                             rejects["band"].to_pylist()))
    assert sorted(np.flatnonzero(np.isnan(got).any(axis=1)).tolist()) == rejected
    return got


def test_equal_to_embed_on_the_shipped_sample():
    path = sample_path()
    table = pq.read_table(path)
    emb = Embedder(device="cpu")
    assert emb.shape == (256,)
    got = assert_same_as_embed(emb, path, table)
    assert got.shape == (table.num_rows, 256) and np.isfinite(got).all()
    # One curve at a time gives the same vector.
    t, m, err = curves_of(table)[3]
    np.testing.assert_allclose(emb(t, m, err), got[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb(t, m), got[3], rtol=1e-5, atol=1e-6)  # err only cleans


def test_equal_to_embed_on_eros1(shared_data, tiny_model_dir):
    path = shared_data / "eros1.parquet"
    table = pq.read_table(path)
    assert_same_as_embed(Embedder(tiny_model_dir, device="cpu"), path, table)
    part = table.slice(0, 1000)
    assert_same_as_embed(Embedder(tiny_model_dir, device="cpu", window_mode="nonoverlap"),
                         part, part)


def test_equal_to_embed_on_eros1_with_the_packaged_model(shared_data):
    table = pq.read_table(shared_data / "eros1.parquet").slice(0, 150)
    emb = Embedder(device="cpu")
    assert_same_as_embed(emb, table, table)


def test_layers_and_batching(tiny_model_dir):
    rng = np.random.default_rng(0)
    curves = []
    for n in (7, 250, 40, 601):
        t = np.sort(rng.uniform(0, 1000, n))
        curves.append((t, 15 + np.sin(t / 30), np.full(n, 0.05)))
    emb = Embedder(tiny_model_dir, device="cpu", layers=True, chunk_curves=3)
    out = emb.many(curves)
    assert out.shape == (4,) + emb.shape == (4, 2, 32)
    last = Embedder(tiny_model_dir, device="cpu").many(curves)
    np.testing.assert_allclose(out[:, -1], last, rtol=1e-5, atol=1e-6)
    assert emb.many([]).shape == (0, 2, 32)


def test_bad_curves_are_named(tiny_model_dir):
    emb = Embedder(tiny_model_dir, device="cpu")
    t = np.arange(20.0)
    with pytest.raises(ValueError, match="same length"):
        emb(t, np.ones(19))
    with pytest.raises(ValueError, match="one-dimensional"):
        emb(t.reshape(4, 5), np.ones((4, 5)))
    with pytest.raises(ValueError, match="array of numbers"):
        emb(t, ["a"] * 20)
    with pytest.raises(ValueError, match=r"curve 0: 3 valid observation\(s\) left"):
        emb(t[:3], np.ones(3))
    nan_mags = np.where(t < 17, np.nan, 1.0)  # three finite magnitudes left
    with pytest.raises(ValueError, match="1 light curve"):
        emb(t, nan_mags)
    good = (t, np.sin(t))
    out = emb.many([good, (t[:2], np.ones(2)), good], on_reject="zero")
    assert (out[1] == 0).all() and np.isfinite(out).all() and (out[0] == out[2]).all()
    with pytest.raises(ValueError, match="all or none"):
        emb.many([good, (t, np.sin(t), np.ones(20))])
    with pytest.raises(ValueError, match="on_reject"):
        emb.many([good], on_reject="drop")
    with pytest.raises(ValueError, match="embed\\(table\\)"):
        emb.many(pa.table({"x": [1]}))
    with pytest.raises(ValueError, match="columns"):
        Embedder(tiny_model_dir, columns={"time": "hmjd"})
    with pytest.raises(ValueError, match="window_mode"):
        Embedder(tiny_model_dir, window_mode="sliding")


def test_to_parquet_uses_the_columns(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(1)
    t = [np.sort(rng.uniform(0, 500, 60)) for _ in range(3)]
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"objid": ["a", "b", "c"], "when": [x.tolist() for x in t],
                             "brightness": [np.sin(x).tolist() for x in t]}), src)
    emb = Embedder(tiny_model_dir, device="cpu",
                   columns=Columns(id="objid", time="when", mag="brightness"))
    summary = emb.to_parquet(src, tmp_path / "out", progress=False)
    assert summary.embedded == 3 and not summary.failed
    out = pq.read_table(tmp_path / "out" / "in.parquet")
    np.testing.assert_allclose(np.asarray(out["embedding"].to_pylist(), np.float32),
                               emb.many([(x, np.sin(x)) for x in t]), rtol=1e-5, atol=1e-6)


def test_embed_takes_columns_or_the_old_keywords_alike(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(2)
    t = [np.sort(rng.uniform(0, 500, 40)) for _ in range(2)]
    table = pa.table({"objid": ["a", "b"], "when": [x.tolist() for x in t],
                      "brightness": [np.cos(x).tolist() for x in t]})
    kw = dict(model=tiny_model_dir, device="cpu", progress=False)
    with_columns = embed(table, columns=Columns(id="objid", time="when", mag="brightness"),
                         **kw)
    with_keywords = embed(table, id_col="objid", time_col="when", mag_col="brightness", **kw)
    assert with_columns.equals(with_keywords) and with_columns.num_rows == 2
    with pytest.raises(ValueError, match="not both"):
        embed(table, columns=Columns(id="objid"), time_col="when", **kw)
    with pytest.raises(ValueError, match="Columns.time must be a column name"):
        Columns(time=3)
    with pytest.raises(ValueError, match="Columns.layout"):
        Columns(layout="wide")
    with pytest.raises(TypeError, match="idcol"):
        embed(table, idcol="objid", **kw)
