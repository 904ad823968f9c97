"""The evaluation's feature baseline: the light-curve package's extractors (default when
installed), the builtin statistics as the fallback, and clear errors."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from astromer_fast.data import Curves
from astromer_fast.evaluation import features as F
from astromer_fast.evaluation.run import EvalSettings, evaluate

from test_evaluation import synthetic_table

needs_lc = pytest.mark.skipif(not F.light_curve_package_available(),
                              reason="the light-curve package is not installed "
                                     "(pip install light-curve)")


def curves_for_test():
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 500, 150))
    period = 0.55
    m = 15 + 0.4 * np.sin(2 * np.pi * t / period) + 0.02 * rng.normal(size=t.size)
    e = np.full(t.size, 0.02)
    return Curves.from_arrays([t, t[:2], np.arange(30.0)],
                              [m, m[:2], 15 + 0.01 * rng.normal(size=30)],
                              [e, e[:2], np.full(30, 0.01)])


@needs_lc
def test_light_curve_package_features_shape_and_undefined_values():
    names = F.lc_package_feature_names()
    x = F.lc_package_features(curves_for_test())
    assert x.shape == (3, len(names)) and x.dtype == np.float32
    assert np.isfinite(x[0]).all() and np.isfinite(x[2]).all()
    assert np.isnan(x[1]).any()          # two points: most statistics are undefined
    assert not np.isinf(x).any()         # undefined is NaN, never inf
    k = names.index("periodogram_period_0")
    # log10 of days, inside the searched range (0.2 d .. the span)
    assert np.log10(0.1) < x[0, k] < np.log10(500)


@needs_lc
def test_default_feature_set_is_light_curve_when_installed():
    assert F.resolve_feature_set(None) == "light-curve"
    assert F.feature_names("light-curve") == F.lc_package_feature_names()
    assert F.feature_names("builtin") == F.FEATURE_NAMES


def test_fallback_to_builtin_with_a_message(monkeypatch):
    monkeypatch.setattr(F, "light_curve_package_available", lambda: False)
    said = []
    assert F.resolve_feature_set(None, said.append) == "builtin"
    assert said and "pip install light-curve" in said[0]
    with pytest.raises(RuntimeError, match="pip install light-curve"):
        F.resolve_feature_set("light-curve")
    with pytest.raises(ValueError, match="feature_set must be one of"):
        F.resolve_feature_set("feets")


@pytest.mark.parametrize("feature_set", ["builtin", pytest.param("light-curve", marks=needs_lc)])
def test_evaluate_features_only_with_each_set(feature_set):
    s = EvalSettings(spc=(6,), folds=1, figures=False, feature_set=feature_set)
    res = evaluate(synthetic_table(bands=("r",)), "label", models=(), settings=s, log=None)
    assert res.methods == ["features"] and res.settings["feature_set"] == feature_set
    # Two classes a period search tells apart at once.
    assert res.runs[0]["macro_f1"] > 0.8


def test_cli_feature_set(tmp_path):
    from astromer_fast.cli import main

    path = tmp_path / "lc.parquet"
    pq.write_table(synthetic_table(bands=("r",)), path)
    out = tmp_path / "rep"
    rc = main(["evaluate", str(path), "--features-only", "--spc", "4", "--folds", "1",
               "--feature-set", "builtin", "--no-figures", "--out", str(out), "-q"])
    assert rc == 0
    assert "16 builtin statistics" in (out / "report.md").read_text()
    with pytest.raises(SystemExit):
        main(["evaluate", str(path), "--feature-set", "feets", "--out", str(out)])


@needs_lc
def test_light_curve_features_on_real_eros1_curves(shared_data):
    from astromer_fast.evaluation.dataset import load_labelled

    path = shared_data / "eros1.parquet"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    from test_evaluation import eros_subset

    ds = load_labelled(eros_subset(shared_data), "label", split_col="split")
    x = F.lc_package_features(ds.curves)
    assert np.isfinite(x).all(axis=1).mean() > 0.95
