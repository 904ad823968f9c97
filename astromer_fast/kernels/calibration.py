"""Which GPU path ``embed`` takes, chosen by measurement on the GPU at hand and cached on disk.

The candidates are whole encoder paths, timed on the same windows at a few widths: ``plain``
(the model under bf16 autocast, attention by ``backends.CUDA_DEFAULTS``: SDPA) and the fused GPU
encoder (``model/fused_gpu.py``) with each attention it can run (``fused:sdpa``,
``fused:triton:1`` and ``fused:triton:2`` for one or two pipeline stages, ``fused:cuda_tc``), all
with cuBLAS GEMMs and Triton element-wise passes. A second round takes the fastest of those fused
candidates' attention with Triton GEMMs instead: ``fused-tg:<attention>`` (the element-wise work
in the GEMMs' epilogues, ``gemm="triton"``) and ``fused-mlp:<attention>`` (also both feed-forward
layers in one kernel, ``gemm="triton_mlp"``), plus ``fused-block:triton:1`` and
``fused-block:triton:2`` (attention, output projection and LN1 in one kernel too, three launches
per block, ``gemm="triton_block"``). Two rounds rather than every pairing: the GEMMs and the
attention are separate kernels, and each candidate costs compile time on the GPU.
A candidate must first match the float32 plain model on the same windows (cosine of every window
embedding, ``MIN_COSINE``); the fastest over all widths of those that passed is the choice.
``plain`` is always a candidate, so the default is never slower than SDPA on the widths measured.

The result is a JSON file under ``$ASTROMER_FAST_CACHE`` (else ``~/.cache/astromer_fast``), named
by a hash of its key: the GPU's name and compute capability, torch, Triton and astromer_fast
versions. Another GPU or a new version misses the cache and calibrates again. Without a cached
result (or with a failed calibration) the fallback is ``plain``, i.e. ``CUDA_DEFAULTS``.

The first CUDA ``embed`` without a cached result runs ``astromer-fast calibrate`` in a child
process with a time limit (a stalled kernel cannot hang the caller); ``$ASTROMER_FAST_CALIBRATE=0``
turns that off (the fallback is then used until ``astromer-fast calibrate`` is run).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CACHE_ENV = "ASTROMER_FAST_CACHE"
CALIBRATE_ENV = "ASTROMER_FAST_CALIBRATE"
TIMEOUT_ENV = "ASTROMER_FAST_CALIBRATE_TIMEOUT"
_FUSED = ("sdpa", "triton:1", "triton:2", "cuda_tc")
_GEMM_PREFIX = {"fused": "cublas", "fused-tg": "triton", "fused-mlp": "triton_mlp",
                "fused-block": "triton_block"}
_BLOCK = ("fused-block:triton:1", "fused-block:triton:2")
ATTENTION_CANDIDATES = ("plain",) + tuple(f"fused:{a}" for a in _FUSED)
CANDIDATES = ATTENTION_CANDIDATES + tuple(f"{p}:{a}" for p in ("fused-tg", "fused-mlp")
                                          for a in _FUSED) + _BLOCK
WIDTHS = (48, 112, 200)
MIN_COSINE = 0.995
FORMAT = 2  # 2: choices name their GEMMs


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env) if env else Path.home() / ".cache" / "astromer_fast"


def _versions() -> dict:
    from astromer_fast import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - no or broken Triton: the key says so
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "astromer_fast": __version__}


def calibration_key(device) -> dict:
    """What a calibration depends on: the GPU model and the software that runs on it."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"calibration is for CUDA devices, got {device}")
    props = torch.cuda.get_device_properties(device)
    return {"format": FORMAT, "gpu": props.name, "capability": f"{props.major}.{props.minor}",
            **_versions()}


def cache_path(key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"calibration-{digest}.json"


def load(key: dict) -> dict | None:
    """The cached calibration for ``key``, or None (absent, unreadable or another key's)."""
    path = cache_path(key)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    return data


def save(key: dict, result: dict) -> Path:
    """Writes ``result`` (with ``key``) atomically: a concurrent reader sees the old file or the
    new one, never half of one."""
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**result, "key": key}, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def parse_candidate(name: str) -> dict:
    """``"fused-tg:triton:2"`` -> {"path": "fused", "attention": "triton", "stages": 2,
    "gemm": "triton"}; ``fused:`` candidates take cuBLAS GEMMs, ``fused-mlp:`` the fused
    feed-forward kernel."""
    parts = name.split(":")
    if parts == ["plain"]:
        return {"path": "plain", "attention": None, "stages": None, "gemm": None}
    if parts[0] not in _GEMM_PREFIX or len(parts) not in (2, 3):
        raise ValueError(f"unknown calibration candidate {name!r}")
    stages = int(parts[2]) if len(parts) == 3 else None
    return {"path": "fused", "attention": parts[1], "stages": stages,
            "gemm": _GEMM_PREFIX[parts[0]]}


def gemm_candidates(rows: list[dict]) -> tuple[str, ...]:
    """The second round: the fastest cuBLAS-GEMM fused candidate's attention with each Triton
    GEMM form (none when no fused candidate passed the first round), and the one-kernel
    attention half when the Triton attention passed it."""
    best = select([r for r in rows if r["candidate"].startswith("fused:")])
    if best is None:
        return ()
    attention = best.split(":", 1)[1]
    out = (f"fused-tg:{attention}", f"fused-mlp:{attention}")
    if select([r for r in rows if r["candidate"].startswith("fused:triton")]) is not None:
        out += _BLOCK
    return out


def select(rows: list[dict]) -> str | None:
    """The candidate with the least total time over the widths, among those that passed the check
    at every width (rows: {"candidate", "width", "seconds", "passed"}); None if none passed."""
    total: dict[str, float] = {}
    failed = set()
    widths = {r["width"] for r in rows}
    seen: dict[str, set] = {}
    for r in rows:
        name = r["candidate"]
        if not r.get("passed") or r.get("seconds") is None:
            failed.add(name)
            continue
        total[name] = total.get(name, 0.0) + float(r["seconds"])
        seen.setdefault(name, set()).add(r["width"])
    ok = {n: s for n, s in total.items() if n not in failed and seen[n] == widths}
    return min(ok, key=lambda n: (ok[n], CANDIDATES.index(n) if n in CANDIDATES else 99)) \
        if ok else None


def time_call(fn, device, reps: int = 5) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs on ``device``, after one warm-up run."""
    cuda = torch.device(device).type == "cuda"
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synthetic_windows(batch: int, width: int, device, seed: int = 0):
    """(t, m, valid) windows like real ones after ``embed``'s sort: valid counts from width / 2 to
    width, valid observations first, times in days centred per window."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(max(1, width // 2), width + 1, (batch,), generator=g)
    counts[0] = width
    valid = torch.arange(width)[None, :] < counts[:, None]
    t = torch.cumsum(torch.rand(batch, width, generator=g) * 3.0, 1)
    t = (t - t.mean(1, keepdim=True)) * valid
    m = torch.randn(batch, width, generator=g) * 0.3 * valid
    return t.to(device), m.to(device), valid.to(device)


def _runner(model, name: str, device):
    """A function (t, m, valid) -> (B, D) float32 for a candidate."""
    spec = parse_candidate(name)
    if spec["path"] == "plain":
        from astromer_fast.model import masked_mean

        def plain(t, m, valid):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model.encode(t, m, ~valid)
            return masked_mean(out.last.float(), valid)

        return plain
    from astromer_fast.model.fused_gpu import FusedGpuEncoder

    return FusedGpuEncoder(model, attention=spec["attention"], stages=spec["stages"],
                           gemm=spec["gemm"])


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def measure(model, device, candidates=ATTENTION_CANDIDATES, widths=WIDTHS, batch: int = 1024,
            reps: int = 5, timer=None, log=None) -> list[dict]:
    """One row per (candidate, width): seconds (median), whether it passed the check against the
    float32 plain model, its worst cosine, and the error when it could not run."""
    device = torch.device(device)
    timer = timer or time_call
    model = model.to(device).eval()
    rows = []
    for width in widths:
        t, m, valid = synthetic_windows(batch, width, device)
        with torch.no_grad():
            ref = model.embed_windows(t, m, valid).float()
        for name in candidates:
            row = {"candidate": name, "width": width, "batch": batch, "seconds": None,
                   "passed": False}
            try:
                run = _runner(model, name, device)
                with torch.no_grad():
                    out = run(t, m, valid)
                    cos = _cosines(out, ref)
                    row["min_cosine"] = float(cos.min())
                    row["passed"] = bool(torch.isfinite(out).all()) and row["min_cosine"] >= \
                        MIN_COSINE
                    if row["passed"]:
                        row["seconds"] = float(timer(lambda: run(t, m, valid), device, reps))
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run is left out
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            rows.append(row)
            if log is not None:
                log(row)
    return rows


def calibrate(device="cuda", model=None, candidates=None, **kw) -> dict:
    """Measures the candidates on ``device`` (by default the two rounds of the module's
    docstring) and caches the choice; returns the cached record."""
    device = torch.device(device)
    key = calibration_key(device)
    if model is None:
        from astromer_fast.model import Astromer
        from astromer_fast.weights.packaged import packaged_model_path

        model = Astromer.from_pretrained(packaged_model_path(None))
    t0 = time.perf_counter()

    def record(rows, complete: bool) -> dict:
        best = select(rows)
        result = {"choice": parse_candidate(best) if best else None, "candidate": best,
                  "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": complete}
        save(key, result)
        return result

    if candidates is None:
        rows = measure(model, device, ATTENTION_CANDIDATES, **kw)
        # Cached at once: a calibration stopped in its second round (a time limit, a stalled
        # kernel) still leaves the first round's measured choice.
        record(rows, complete=False)
        rows += measure(model, device, gemm_candidates(rows), **kw)
    else:
        rows = measure(model, device, candidates, **kw)
    result = record(rows, complete=True)
    return load(key) or result


def cached_choice(device) -> dict | None:
    """The calibrated choice for ``device`` ({"path", "attention", "stages", "gemm"}), running the
    calibration in a child process first when nothing is cached (unless
    ``$ASTROMER_FAST_CALIBRATE=0``); None means: use the fallback."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    key = calibration_key(device)
    data = load(key)
    if data is None and os.environ.get(CALIBRATE_ENV, "1").strip() != "0":
        data = _calibrate_in_child(device, key)
    return data.get("choice") if data else None


def _calibrate_in_child(device, key) -> dict | None:
    timeout = float(os.environ.get(TIMEOUT_ENV, "300"))
    cmd = [sys.executable, "-m", "astromer_fast", "calibrate", "--device", str(device)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        why = None if proc.returncode == 0 else (proc.stderr or proc.stdout)[-500:]
    except (OSError, subprocess.TimeoutExpired) as e:
        why = f"{type(e).__name__}: {e}"
    data = load(key)
    if data is None:
        # Recorded so that every later run takes the fallback at once instead of retrying.
        save(key, {"choice": None, "candidate": None, "rows": [],
                   "error": why or "calibration wrote no result"})
        data = load(key)
    return data


__all__ = ["ATTENTION_CANDIDATES", "CANDIDATES", "cache_dir", "cache_path", "cached_choice",
           "calibrate", "calibration_key", "gemm_candidates", "load", "measure", "parse_candidate",
           "save", "select"]
