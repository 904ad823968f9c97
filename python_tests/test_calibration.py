"""GPU path calibration (kernels/calibration.py), its use by embed (embedding/device.py) and the
double-buffered host-to-device copies (embedding/h2d.py): the selection and caching logic on the
CPU with fake timings; the copies on a GPU."""

import json
import subprocess

import pytest
import torch

from astromer_fast import Astromer, AstromerConfig
from astromer_fast.embedding import device as device_mod
from astromer_fast.embedding import h2d
from astromer_fast.kernels import calibration as cal

KEY = {"format": cal.FORMAT, "gpu": "Fake GPU", "capability": "9.0", "torch": "x",
       "triton": "y", "astromer_fast": "z"}


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv(cal.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cal, "calibration_key", lambda device: dict(KEY))
    return tmp_path


def row(name, width, seconds, passed=True):
    return {"candidate": name, "width": width, "seconds": seconds if passed else None,
            "passed": passed}


def test_select_takes_the_fastest_total_of_those_that_passed_everywhere():
    rows = [row("plain", 48, 1.0), row("plain", 200, 3.0),
            row("fused:sdpa", 48, 0.5), row("fused:sdpa", 200, 2.0),
            row("fused:triton:1", 48, 0.1), row("fused:triton:1", 200, 9.0, passed=False),
            row("fused:cuda_tc", 48, 0.2)]  # never measured at 200: not a candidate
    assert cal.select(rows) == "fused:sdpa"
    assert cal.select([row("plain", 48, 1.0, passed=False)]) is None
    assert cal.select([]) is None


def test_parse_candidate():
    assert cal.parse_candidate("plain") == {"path": "plain", "attention": None, "stages": None,
                                            "gemm": None}
    assert cal.parse_candidate("fused:triton:2") == {"path": "fused", "attention": "triton",
                                                     "stages": 2, "gemm": "cublas"}
    assert cal.parse_candidate("fused-tg:triton:1") == {"path": "fused", "attention": "triton",
                                                        "stages": 1, "gemm": "triton"}
    assert cal.parse_candidate("fused:sdpa")["stages"] is None
    assert all(cal.parse_candidate(c) for c in cal.CANDIDATES)
    assert "fused-tg:sdpa" in cal.CANDIDATES and "fused:cuda_tc" in cal.CANDIDATES
    with pytest.raises(ValueError, match="unknown calibration candidate"):
        cal.parse_candidate("fast")


def test_cache_round_trip_key_mismatch_and_corrupt_file(cache):
    assert cal.load(KEY) is None
    path = cal.save(KEY, {"choice": {"path": "plain"}})
    assert path.parent == cache and cal.load(KEY)["choice"] == {"path": "plain"}
    other = dict(KEY, torch="another version")
    assert cal.cache_path(other) != path and cal.load(other) is None
    # A file under the right name holding another key (a hash collision, a hand edit) is ignored.
    cal.cache_path(other).write_text(json.dumps({"key": KEY, "choice": None}))
    assert cal.load(other) is None
    path.write_text("{not json")
    assert cal.load(KEY) is None


def test_measure_and_calibrate_pick_the_fastest_correct_candidate(cache, monkeypatch):
    torch.manual_seed(0)
    model = Astromer(AstromerConfig(n_blocks=1, d_model=32, n_heads=2, dff=64)).eval()
    fake = {"plain": 3.0, "fused:sdpa": 1.0, "fused:cuda_tc": 0.1, "fused-tg:sdpa": 0.05}
    calls = []

    def timer(fn, device, reps):
        name = calls[-1]
        fn()
        return fake[name]

    real_runner = cal._runner

    def runner(model, name, device):
        calls.append(name)
        return real_runner(model, name, device)

    monkeypatch.setattr(cal, "_runner", runner)
    logged = []
    result = cal.calibrate("cpu", model, candidates=tuple(fake), widths=(9, 20), batch=8,
                           reps=1, timer=timer, log=logged.append)
    assert len(logged) == 8
    rows = result["rows"]
    assert len(rows) == 8
    tc = [r for r in rows if r["candidate"] == "fused:cuda_tc"]
    assert all(not r["passed"] and "tensor-core" in r["error"] for r in tc)
    # Compiled Triton GEMMs cannot run on CPU tensors: left out, however fast they would be.
    tg = [r for r in rows if r["candidate"] == "fused-tg:sdpa"]
    assert all(not r["passed"] and "Triton" in r["error"] for r in tg), tg
    assert all(r["passed"] for r in rows if r["candidate"] in ("plain", "fused:sdpa")), rows
    assert result["candidate"] == "fused:sdpa"
    assert result["choice"] == {"path": "fused", "attention": "sdpa", "stages": None,
                                "gemm": "cublas"}
    assert cal.load(KEY)["candidate"] == "fused:sdpa"


def test_calibration_tries_the_triton_gemms_with_the_fastest_fused_attention(cache, monkeypatch):
    torch.manual_seed(0)
    model = Astromer(AstromerConfig(n_blocks=1, d_model=32, n_heads=2, dff=64)).eval()
    fake = {"plain": 3.0, "fused:sdpa": 2.0, "fused:triton:1": 1.0, "fused:triton:2": 1.5,
            "fused:cuda_tc": None, "fused-tg:triton:1": 0.9, "fused-mlp:triton:1": 0.7,
            "fused-block:triton:1": 0.8, "fused-block:triton:2": None}
    measured = []

    def runner(model, name, device):
        measured.append(name)
        if fake[name] is None:
            raise ValueError("cannot run here")
        return lambda t, m, v: model.embed_windows(t, m, v)

    monkeypatch.setattr(cal, "_runner", runner)
    result = cal.calibrate("cpu", model, widths=(9,), batch=8, reps=1,
                           timer=lambda fn, device, reps: fake[measured[-1]])
    assert measured == list(cal.ATTENTION_CANDIDATES) + [
        "fused-tg:triton:1", "fused-mlp:triton:1", "fused-block:triton:1", "fused-block:triton:2"]
    assert result["candidate"] == "fused-mlp:triton:1"
    assert result["choice"] == {"path": "fused", "attention": "triton", "stages": 1,
                                "gemm": "triton_mlp"}
    assert cal.load(KEY)["complete"] is True
    assert cal.gemm_candidates([row("plain", 9, 1.0)]) == ()
    # Without a working Triton attention, no one-kernel attention half.
    assert cal.gemm_candidates([row("fused:sdpa", 9, 1.0), row("fused:triton:1", 9, 0.5, False)]) \
        == ("fused-tg:sdpa", "fused-mlp:sdpa")
    assert cal.parse_candidate("fused-block:triton:2")["gemm"] == "triton_block"


def test_a_calibration_stopped_in_its_second_round_leaves_the_first_rounds_choice(cache,
                                                                                 monkeypatch):
    model = Astromer(AstromerConfig(n_blocks=1, d_model=32, n_heads=2, dff=64)).eval()
    fake = {"plain": 3.0, "fused:sdpa": 1.0}

    def runner(model, name, device):
        if name.startswith("fused-"):
            raise KeyboardInterrupt  # what a time limit's signal looks like from inside
        if name not in fake:
            raise ValueError("cannot run here")
        fake["last"] = fake[name]
        return lambda t, m, v: model.embed_windows(t, m, v)

    monkeypatch.setattr(cal, "_runner", runner)
    with pytest.raises(KeyboardInterrupt):
        cal.calibrate("cpu", model, widths=(9,), batch=8, reps=1,
                      timer=lambda fn, device, reps: fake["last"])
    cached = cal.load(KEY)
    assert cached["candidate"] == "fused:sdpa" and cached["complete"] is False


def test_a_wrong_candidate_fails_the_check(cache, monkeypatch):
    model = Astromer(AstromerConfig(n_blocks=1, d_model=32, n_heads=2, dff=64)).eval()
    monkeypatch.setattr(cal, "_runner", lambda model, name, device:
                        (lambda t, m, v: torch.randn(t.shape[0], 32)))
    rows = cal.measure(model, "cpu", candidates=("plain",), widths=(9,), batch=8,
                       timer=lambda *a: 1.0)
    assert not rows[0]["passed"] and rows[0]["seconds"] is None and rows[0]["min_cosine"] < 0.9


def test_cached_choice_runs_a_child_once_and_falls_back_when_it_fails(cache, monkeypatch):
    runs = []

    def fake_run(cmd, **kw):
        runs.append(cmd)
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))

    monkeypatch.setattr(cal.subprocess, "run", fake_run)
    monkeypatch.setenv(cal.CALIBRATE_ENV, "0")
    assert cal.cached_choice("cuda") is None and runs == []
    monkeypatch.delenv(cal.CALIBRATE_ENV)
    assert cal.cached_choice("cuda") is None
    assert len(runs) == 1 and runs[0][-3:] == ["calibrate", "--device", "cuda"]
    assert "TimeoutExpired" in cal.load(KEY)["error"]
    assert cal.cached_choice("cuda") is None and len(runs) == 1  # the failure is remembered
    assert cal.cached_choice("cpu") is None


def test_cached_choice_reads_the_calibration(cache):
    cal.save(KEY, {"choice": {"path": "fused", "attention": "triton", "stages": 2}})
    assert cal.cached_choice("cuda") == {"path": "fused", "attention": "triton", "stages": 2}


def test_gpu_path_environment_calibration_and_fallback(monkeypatch):
    monkeypatch.setattr(cal, "cached_choice", lambda device: None)
    monkeypatch.delenv("ASTROMER_FAST_GPU_PATH", raising=False)
    assert device_mod.gpu_path(torch.device("cuda"))["path"] == "plain"
    assert device_mod.gpu_path(torch.device("cuda"))["source"] == "fallback"
    choice = {"path": "fused", "attention": "sdpa", "stages": None}
    monkeypatch.setattr(cal, "cached_choice", lambda device: choice)
    assert device_mod.gpu_path(torch.device("cuda")) == {**choice, "source": "calibration"}
    monkeypatch.setenv("ASTROMER_FAST_GPU_PATH", "plain")
    assert device_mod.gpu_path(torch.device("cuda"))["path"] == "plain"
    monkeypatch.setenv("ASTROMER_FAST_GPU_PATH", "fastest")
    with pytest.raises(ValueError, match="ASTROMER_FAST_GPU_PATH"):
        device_mod.gpu_path(torch.device("cuda"))


def test_host_batches_on_the_cpu_are_the_slices():
    host = {"t": torch.arange(40.).view(8, 5), "valid": torch.arange(40).view(8, 5) % 3 == 0}
    batches = [(slice(0, 3), 5), (slice(3, 6), 2), (slice(6, 8), 1)]
    got = list(h2d.iter_batches(host, ("t", "valid"), batches, "cpu", 3))
    assert not h2d.double_buffering(torch.device("cpu"))
    assert len(got) == 3
    for (sl, w), b in zip(batches, got):
        assert torch.equal(b["t"], host["t"][sl, :w]) and torch.equal(b["valid"],
                                                                       host["valid"][sl, :w])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("double", ["1", "0"])
def test_gpu_double_buffered_copies_deliver_every_batch(monkeypatch, double):
    monkeypatch.setenv(h2d.DOUBLE_BUFFER_ENV, double)
    n, width = 1000, 200
    host = {"t": torch.randn(n, width).pin_memory(),
            "valid": (torch.rand(n, width) > 0.3).pin_memory()}
    batches = [(slice(s, min(s + 64, n)), max(1, width - s // 10)) for s in range(0, n, 64)]
    sums = []
    for b in h2d.iter_batches(host, ("t", "valid"), batches, "cuda", 64):
        # Work long enough on the device that a refill too early would show.
        x = b["t"]
        for _ in range(20):
            x = x * 1.0001
        sums.append((x * b["valid"]).double().sum())
    want = [(host["t"][sl, :w].double() * 1.0001 ** 20 * host["valid"][sl, :w]).sum()
            for sl, w in batches]
    got = torch.stack(sums).cpu()
    assert torch.allclose(got, torch.stack(want), rtol=1e-4), (got, want)
