"""The downstream evaluation: SPC sampler and folds, γ weighting, classifier, features, the
scikit-learn wrappers, finetuning plumbing, and the report folder on real EROS-1 curves."""

import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from astromer_fast import Astromer, AstromerConfig
from astromer_fast.evaluation import (
    ClassifierSettings,
    EvalSettings,
    GammaWeighting,
    evaluate,
    fit_classifier,
    make_folds,
    sample_per_class,
)
from astromer_fast.evaluation.features import FEATURE_NAMES, best_period, light_curve_features
from astromer_fast.evaluation.metrics import scores
from astromer_fast.evaluation.protocol import cap_per_class, split_validation, stratified_split

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path, min_bytes=2000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name}: not a PNG"
    assert len(data) >= min_bytes, f"{path.name}: only {len(data)} bytes"
    # IHDR chunk: length 13, then width and height; its CRC must match.
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 200 and height >= 150, f"{path.name}: {width}x{height}"
    (crc,) = struct.unpack(">I", data[29:33])
    assert crc == zlib.crc32(data[12:29]) & 0xFFFFFFFF
    assert data.rstrip()[-8:-4] == b"IEND", f"{path.name}: truncated"
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    assert img.shape[:2] == (height, width)
    assert np.ptp(img[..., :3]) > 0, f"{path.name}: blank image"


def tiny_model(seed=0, n_blocks=2):
    torch.manual_seed(seed)
    return Astromer(AstromerConfig(n_blocks=n_blocks, d_model=64, n_heads=4, dff=64)).eval()


def synthetic_table(n_per_class=12, bands=("g", "r"), n_test=6, n_obs=60, seed=0):
    """Two easily told apart classes: slow sinusoids ("slow") and fast noisy ones ("fast")."""
    rng = np.random.default_rng(seed)
    rows = {"id": [], "band": [], "label": [], "split": [], "lightcurve": []}
    for label, period, amp in (("slow", 40.0, 1.0), ("fast", 0.7, 0.2)):
        for i in range(n_per_class + n_test):
            split = "train" if i < n_per_class else "test"
            for b in bands:
                t = np.sort(rng.uniform(0, 300, n_obs)) + 50000
                m = 17 + amp * np.sin(2 * np.pi * t / period) + 0.02 * rng.normal(size=n_obs)
                rows["id"].append(f"{label}{i}")
                rows["band"].append(b)
                rows["label"].append(label)
                rows["split"].append(split)
                rows["lightcurve"].append([{"time": float(a), "mag": float(c), "magerr": 0.02}
                                           for a, c in zip(t, m)])
    return pa.table(rows)


# ------------------------------------------------------------------------------------------------
# Protocol
# ------------------------------------------------------------------------------------------------

def test_sample_per_class_counts_and_replacement():
    labels = np.array(["a"] * 50 + ["b"] * 8 + ["c"] * 20)
    idx = sample_per_class(labels, 20, np.random.default_rng(0))
    for c, pool in (("a", 50), ("b", 8), ("c", 20)):
        got = idx[labels[idx] == c]
        assert len(got) == 20
        if pool >= 20:
            assert len(np.unique(got)) == 20  # without replacement
        else:
            # every available sample at least once, the shortfall drawn again
            assert set(got) == set(np.flatnonzero(labels == c))
    with pytest.raises(ValueError):
        sample_per_class(labels, 0, np.random.default_rng(0))


def test_make_folds_deterministic_disjoint_validation():
    labels = np.array(["a"] * 300 + ["b"] * 30 + ["c"] * 120)
    folds = make_folds(labels, spcs=(20, 100), n_folds=3, seed=7)
    assert [(f.spc, f.fold) for f in folds] == [(20, 0), (20, 1), (20, 2),
                                               (100, 0), (100, 1), (100, 2)]
    again = make_folds(labels, spcs=(20, 100), n_folds=3, seed=7)
    for f, g in zip(folds, again):
        np.testing.assert_array_equal(f.train, g.train)
        np.testing.assert_array_equal(f.val, g.val)
    # Draws depend on (seed, spc, fold) only, not on which other scenarios run.
    alone = make_folds(labels, spcs=(100,), n_folds=2, seed=7)
    np.testing.assert_array_equal(alone[1].train, folds[4].train)
    other = make_folds(labels, spcs=(20,), n_folds=1, seed=8)[0]
    assert not np.array_equal(other.train, folds[0].train)
    assert not np.array_equal(folds[0].train, folds[1].train)
    for f in folds:
        both = f.indices
        for c in "abc":
            assert (labels[both] == c).sum() == f.spc
        assert not set(f.train) & set(f.val)  # a duplicated sample never straddles the split
        assert len(f.val) > 0


def test_split_validation_and_caps():
    labels = np.array(["a"] * 10 + ["b"] * 3)
    idx = np.array([0, 1, 2, 3, 4, 10, 10, 11, 12, 12])
    tr, va = split_validation(idx, labels, 0.2, np.random.default_rng(0))
    assert sorted(np.concatenate([tr, va]).tolist()) == sorted(idx.tolist())
    assert not set(tr) & set(va)
    assert set(labels[va]) == {"a", "b"}
    keep = cap_per_class(labels, 2, seed=0)
    assert (labels[keep] == "a").sum() == 2 and (labels[keep] == "b").sum() == 2
    np.testing.assert_array_equal(cap_per_class(labels, None), np.arange(13))
    groups = np.repeat(np.arange(20), 2)  # two bands per object
    lab = np.repeat(np.array(["x"] * 10 + ["y"] * 10), 2)
    test = stratified_split(lab, groups, 0.3, seed=1)
    for g in range(20):
        assert test[2 * g] == test[2 * g + 1]  # both bands on the same side
    assert test.sum() == 2 * 2 * 3  # 30% of 10 objects per class, two curves each


# ------------------------------------------------------------------------------------------------
# γ weighting and the classifier
# ------------------------------------------------------------------------------------------------

def test_gamma_weighting_normalisation():
    g = GammaWeighting(7)
    torch.testing.assert_close(g.gamma.detach(), torch.full((7,), 1 / 7))
    torch.testing.assert_close(g.weights().detach(), torch.full((7,), 1 / 7))
    x = torch.randn(5, 7, 16)
    torch.testing.assert_close(g(x), x.mean(1) / 7)  # uniform softmax, then divided by 7
    with torch.no_grad():
        g.gamma.copy_(torch.arange(7.0))
    w = torch.softmax(torch.arange(7.0), 0)
    torch.testing.assert_close(g(x), (w[None, :, None] * x).sum(1) / 7)
    assert float(g.weights().detach().sum()) == pytest.approx(1.0)
    g(x).sum().backward()
    assert g.gamma.grad is not None and torch.isfinite(g.gamma.grad).all()
    with pytest.raises(ValueError):
        g(torch.randn(5, 6, 16))


def test_classifier_architecture():
    from astromer_fast.evaluation.classifier import EmbeddingClassifier

    m = EmbeddingClassifier(7, 256, 5)
    linears = [l for l in m.mlp if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [
        (256, 1024), (1024, 512), (512, 256), (256, 5)]
    assert isinstance(m.mlp[-2], torch.nn.LayerNorm)
    assert sum(isinstance(l, torch.nn.ReLU) for l in m.mlp) == 3
    assert m(torch.randn(3, 7, 256)).shape == (3, 5)
    assert m(torch.randn(3, 7 * 256)).shape == (3, 5)  # flat layer-major input


@pytest.mark.parametrize("standardize", [True, False])
def test_classifier_learns_separable_set(standardize):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 7, 24)) * 3
    y = np.repeat(np.array(["p", "q", "r"]), 40)
    x = centres[np.repeat(np.arange(3), 40)] + rng.normal(size=(120, 7, 24))
    xt = centres[np.repeat(np.arange(3), 30)] + rng.normal(size=(90, 7, 24))
    yt = np.repeat(np.array(["p", "q", "r"]), 30)
    clf = fit_classifier(x[::2], y[::2], x[1::2], y[1::2],
                         settings=ClassifierSettings(max_epochs=60, standardize=standardize))
    assert (clf.predict(xt) == yt).mean() >= 0.95
    assert clf.predict_proba(xt).shape == (90, 3)
    np.testing.assert_allclose(clf.predict_proba(xt).sum(1), 1, rtol=1e-5)
    assert clf.gamma_weights().shape == (7,) and clf.best_epoch >= 1
    assert clf.gamma_weights().sum() == pytest.approx(1.0, abs=1e-6)


def test_scores_match_sklearn():
    from sklearn.metrics import confusion_matrix, f1_score

    rng = np.random.default_rng(1)
    classes = ["a", "b", "c", "d"]
    t = rng.choice(classes[:3], 200)  # "d" never true
    p = rng.choice(classes, 200)
    s = scores(t, p, classes)
    # a class absent from the test set has no F1 and stays out of the macro mean
    assert s["macro_f1"] == pytest.approx(f1_score(t, p, labels=classes[:3], average="macro",
                                                   zero_division=0))
    assert np.isnan(s["per_class_f1"][3])
    np.testing.assert_allclose(s["per_class_f1"][:3], f1_score(t, p, labels=classes[:3],
                                                               average=None))
    np.testing.assert_array_equal(s["confusion"], confusion_matrix(t, p, labels=classes))


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------

def test_lomb_scargle_period_and_features():
    from astromer_fast.evaluation.features import frequency_grid, lomb_scargle

    rng = np.random.default_rng(3)
    t = np.sort(rng.uniform(0, 800, 150)) + 50000.0
    m = 18 + 0.4 * np.sin(2 * np.pi * t / 3.7) + 0.05 * rng.normal(size=150)
    period, power = best_period(t, m)
    assert period == pytest.approx(3.7, rel=1e-3) and power > 0.8
    # the factorised sums against the textbook formula, frequency by frequency
    f = frequency_grid(t.max() - t.min())[::97]
    f = np.linspace(f[0], f[-1], len(f))
    tc, y = t - t.mean(), m - m.mean()
    ref = []
    for fr in f:
        w = 2 * np.pi * fr
        tau = np.arctan2(np.sin(2 * w * tc).sum(), np.cos(2 * w * tc).sum()) / (2 * w)
        c, s = np.cos(w * (tc - tau)), np.sin(w * (tc - tau))
        ref.append(((y @ c) ** 2 / (c @ c) + (y @ s) ** 2 / (s @ s)) / (y @ y))
    np.testing.assert_allclose(lomb_scargle(t, m, f), ref, atol=1e-5)

    from astromer_fast.data import Curves

    curves = Curves.from_arrays([t, t[:2]], [m, m[:2]], [np.full(150, 0.05), [0.1, 0.1]])
    feats = light_curve_features(curves)
    assert feats.shape == (2, len(FEATURE_NAMES))
    assert np.isfinite(feats[0]).all() and np.isnan(feats[1]).all()
    named = dict(zip(FEATURE_NAMES, feats[0]))
    assert named["log10_period"] == pytest.approx(np.log10(3.7), abs=1e-3)
    assert named["eta_folded"] < 0.5 < named["eta"]


# ------------------------------------------------------------------------------------------------
# scikit-learn
# ------------------------------------------------------------------------------------------------

def test_sklearn_pipeline():
    from sklearn.pipeline import make_pipeline

    from astromer_fast.evaluation.sklearn import (
        AstromerEmbedder,
        GammaMLPClassifier,
        LightCurveFeatures,
    )

    table = synthetic_table(n_per_class=15, bands=("r",), n_test=0)
    y = np.array(table["label"].to_pylist())
    model = tiny_model()
    pipe = make_pipeline(AstromerEmbedder(model, layers=True),
                         GammaMLPClassifier(n_layers=3, max_epochs=60))
    pipe.fit(table, y)
    assert (pipe.predict(table) == y).mean() >= 0.9
    emb = pipe[0].transform(table)
    assert emb.shape == (30, 3 * 64)
    names = pipe[0].get_feature_names_out()
    assert len(names) == emb.shape[1] and names[0] == "input_0" and names[-1] == "block2_63"
    assert pipe[-1].gamma_.shape == (3,)

    # Lists of (t, m[, err]) arrays give the same rows as the table.
    curves = [(np.array([r["time"] for r in lc]), np.array([r["mag"] for r in lc]),
               np.array([r["magerr"] for r in lc])) for lc in table["lightcurve"].to_pylist()]
    np.testing.assert_allclose(pipe[0].transform(curves[:4]), emb[:4], rtol=1e-5, atol=1e-6)
    last = AstromerEmbedder(model).fit()
    np.testing.assert_allclose(last.transform(curves[:4]), emb[:4, -64:], rtol=1e-5, atol=1e-6)

    short = curves[:2] + [(np.arange(3.0), np.ones(3))]
    with pytest.raises(ValueError, match="on_short"):
        AstromerEmbedder(model).fit().transform(short)
    out = AstromerEmbedder(model, on_short="nan").fit().transform(short)
    assert np.isnan(out[2]).all() and np.isfinite(out[:2]).all()

    feats = make_pipeline(LightCurveFeatures(), GammaMLPClassifier(n_layers=1, max_epochs=60))
    feats.fit(curves, y)
    assert (feats.predict(curves) == y).mean() >= 0.9
    assert list(feats[0].get_feature_names_out()) == list(FEATURE_NAMES)


# ------------------------------------------------------------------------------------------------
# The run, finetuning plumbing, CLI
# ------------------------------------------------------------------------------------------------

def _fake_finetune(calls):
    class Result:
        def __init__(self, model, history):
            self.model, self.history = model, history

    def finetune(model, curves, settings=None, log=None, **kw):
        calls.append((len(curves), settings))
        steps = settings.max_steps
        hist = [{"step": s, "train_loss": 1.0 / s, "val_loss": 1.2 / s, "val_rmse": 0.3,
                 "val_r2": 0.5} for s in range(1, steps + 1)]
        return Result(model, hist)

    return finetune


def test_evaluate_with_finetuning_concat_bands(tmp_path, monkeypatch):
    from astromer_fast import training

    calls = []
    monkeypatch.setattr(training, "finetune", _fake_finetune(calls), raising=False)
    table = synthetic_table()
    s = EvalSettings(spc=(4, 8), folds=2, finetune_steps=3, tsne_max=40,
                     classifier=ClassifierSettings(max_epochs=40))
    res = evaluate(table, "label", models=[tiny_model()], out=tmp_path / "rep",
                   concat_bands=True, settings=s, log=None)
    assert len(calls) == 4  # one finetune per (spc, fold)
    assert all(c[1].max_steps == 3 for c in calls)
    assert calls[0][0] == 2 * len(np.unique(make_folds(
        np.repeat(["fast", "slow"], 12), (4,), 2)[0].unique))  # both bands of each object
    assert len(res.finetune) == 4
    assert res.dataset["concat_bands"] and res.dataset["n_test_scored"] == 12
    summ = res.summary()
    assert set(summ) == set(res.methods) and len(res.methods) == 3
    assert summ[res.methods[0]][8][0] >= 0.8  # an easy task
    rep = tmp_path / "rep"
    text = (rep / "report.md").read_text()
    assert "## Macro F1" in text and "| 8 SPC |" in text.replace("8 SPC |", "| 8 SPC |", 0) \
        or "8 SPC" in text
    assert (rep / "finetune.png").is_file() and "finetune" in res.figures
    for name in res.figures.values():
        assert_valid_png(rep / name)

    monkeypatch.delattr(training, "finetune")
    with pytest.raises(RuntimeError, match="finetune"):
        evaluate(table, "label", models=[tiny_model()], settings=s, log=None)


def test_evaluate_with_real_finetune():
    """Two real masked-reconstruction steps through astromer_fast.training.finetune."""
    from astromer_fast import training

    if not hasattr(training, "finetune"):
        pytest.skip("astromer_fast.training.finetune is not in this installation")
    table = synthetic_table(n_per_class=6, bands=("r",), n_test=3)
    s = EvalSettings(spc=(4,), folds=1, finetune_steps=2, finetune_batch_size=8,
                     features=False, last_block=False, figures=False,
                     classifier=ClassifierSettings(max_epochs=10))
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = evaluate(table, "label", models=[model], settings=s, log=None)
    (hist,) = res.finetune.values()
    assert hist and "train_loss" in hist[-1]
    assert len(res.runs) == 1 and res.runs[0]["n_test"] == 6
    for k, v in model.state_dict().items():  # the caller's model is left untouched
        torch.testing.assert_close(v, before[k])


def test_cli_evaluate_features_only(tmp_path):
    from astromer_fast.cli import main

    path = tmp_path / "lc.parquet"
    pq.write_table(synthetic_table(bands=("r",)), path)
    out = tmp_path / "rep"
    rc = main(["evaluate", str(path), "--label-col", "label", "--features-only", "--spc", "4",
               "--folds", "2", "--no-figures", "--out", str(out), "-q"])
    assert rc == 0
    text = (out / "report.md").read_text()
    assert "| features |" in text
    assert (out / "runs.csv").read_text().count("\n") == 3  # header + 2 folds


# ------------------------------------------------------------------------------------------------
# Real data: the report on a small EROS-1 subset
# ------------------------------------------------------------------------------------------------

def eros_subset(shared_data, per_class_train=10, per_class_test=5, band="r"):
    path = shared_data / "eros1.parquet"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    t = pq.read_table(path)
    t = t.filter(pc.equal(t["band"], band))
    lab = np.array(t["label"].to_pylist())
    split = np.array(t["split"].to_pylist())
    rng = np.random.default_rng(0)
    idx = []
    for c in np.unique(lab):
        for s, n in (("train", per_class_train), ("test", per_class_test)):
            idx += rng.choice(np.flatnonzero((lab == c) & (split == s)), n, replace=False).tolist()
    return t.take(pa.array(sorted(idx)))


def test_report_on_eros1_subset(shared_data, tmp_path):
    table = eros_subset(shared_data)
    assert table.num_rows == 60
    out = tmp_path / "report"
    s = EvalSettings(spc=(5, 10), folds=2, tsne_max=40)
    res = evaluate(table, "label", models=[None], out=out, settings=s, log=None)
    assert res.classes == ["Cepheid", "EB", "Mira", "RRLyrae"]
    assert res.methods == ["astromer2-base γ-weighted", "astromer2-base last block",
                           "features"]
    assert len(res.runs) == 3 * 2 * 2
    for r in res.runs:
        assert r["n_test"] == 20 and 0.0 <= r["macro_f1"] <= 1.0
        assert np.array(r["confusion"]).sum() == 20
    text = (out / "report.md").read_text()
    for needle in ("## Macro F1 on the test set", "| 5 SPC | 10 SPC |", "## Per-class F1",
                   "## Confusion matrices", "## Learned layer weights", "## Figures",
                   "Skipped (finetune steps = 0)"):
        assert needle in text, needle
    expected = {"f1_vs_spc", "gamma", "tsne_astromer2-base", "attention_astromer2-base",
                "confusion_astromer2-base-gamma-weighted",
                "confusion_astromer2-base-last-block", "confusion_features"}
    assert expected <= set(res.figures)
    pngs = sorted(out.glob("*.png"))
    assert {p.stem for p in pngs} == set(res.figures)
    for p in pngs:
        assert_valid_png(p)
        assert f"]({p.name})" in text
    assert (out / "results.json").is_file() and (out / "runs.csv").is_file()
    # Embeddings were cached: a second run embeds nothing and gives the same scores.
    assert list((out / "cache").glob("emb-astromer2-*.parquet"))
    again = evaluate(table, "label", models=[None], out=tmp_path / "again",
                     cache_dir=out / "cache",
                     settings=EvalSettings(spc=(5, 10), folds=2, figures=False), log=None)
    assert [r["macro_f1"] for r in again.runs] == [r["macro_f1"] for r in res.runs]
    assert again.seconds["embed astromer2-base"] < res.seconds["embed astromer2-base"]


def test_astromer1_weights_embed_like_v2(shared_data):
    """The released Astromer 1 weights go through the same embedding path (3 layers)."""
    from astromer_fast import load_official_checkpoint
    from astromer_fast.data import Curves
    from astromer_fast.evaluation.embeddings import embed_curves

    ckpt = shared_data / "official_weights" / "astromer1_macho_a0.zip"
    if not ckpt.is_file():
        pytest.skip(f"{ckpt} is absent")
    model = load_official_checkpoint(ckpt)
    table = eros_subset(shared_data, 2, 0)
    curves = Curves.from_arrow(table)
    layers, ok = embed_curves(model, curves, layers=True)
    assert ok.all() and layers.shape == (8, 3, 256) and np.isfinite(layers).all()
    last, _ = embed_curves(model, curves, layers=False)
    np.testing.assert_allclose(last, layers[:, -1], rtol=1e-5, atol=1e-6)
