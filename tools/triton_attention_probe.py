"""Which Triton attention variants run, stall or err on this GPU, each in its own process.

On the H200 (2026-11-30) the fp32 Triton attention stalled at L = 7 while L = 1 passed; the cause
is unknown (a compile-only check on the CPU, python_tests/test_triton_compile.py, compiles every
variant in seconds, so it happens at run time). This probe runs forward, then backward, of every
(dtype, L, software-pipeline stages) case in a child process with a deadline, prints the phase it
reached, the time and the error against float64, and writes one JSON. `bench/gpu_check.sh` runs it
first so that a stall costs seconds, not the test stage.

    python tools/triton_attention_probe.py --json probe.json [--deadline 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

_CHILD = r"""
import sys, time, torch
import astromer_fast.kernels  # registers the ops
import astromer_fast.kernels._triton_masked_attention as T
ma = sys.modules["astromer_fast.kernels.masked_attention"]
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[1]]
L, stages = int(sys.argv[2]), int(sys.argv[3])
_meta = T._meta


def meta(q, length):
    m, launch = _meta(q, length)
    launch["num_stages"] = stages
    return m, launch


T._meta = meta
g = torch.Generator().manual_seed(L)
B, H, hd = 3, 4, 64
q, k, v, do = (torch.randn(B, H, L, hd, generator=g, dtype=torch.float64) for _ in range(4))
# (no all-hidden window: float64 keeps the logits under -1e9 where float32 rounds them away; the
# tests cover that row with a float32-faithful oracle)
kh = torch.rand(B, L, generator=g) < 0.3
x = [t.clone().requires_grad_() for t in (q, k, v)]
want = ma.masked_attention_reference(*x, kh, "key")[0]
want_g = torch.autograd.grad(want, x, do)
dev = [t.to("cuda", dtype) for t in (q, k, v, do)]
khd = kh.cuda().view(torch.uint8)
out = torch.full_like(dev[0], float("nan"))
lse = torch.full((B, H, L), float("nan"), device="cuda")
print("phase fwd", flush=True)
t0 = time.perf_counter()
ma._FWD["triton"](*dev[:3], khd, "key", out, lse)
torch.cuda.synchronize()
t1 = time.perf_counter()
err = ((out.double().cpu() - want.detach()).abs().max() / want.detach().abs().max()).item()
print(f"fwd_s {t1 - t0:.3f} fwd_err {err:.3g}", flush=True)
print("phase bwd", flush=True)
grads = [torch.full_like(dev[0], float("nan")) for _ in range(3)]
ma._BWD["triton"](dev[3], *dev[:3], out, lse, khd, "key", *grads)
torch.cuda.synchronize()
t2 = time.perf_counter()
gerr = max(((a.double().cpu() - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, want_g))
print(f"bwd_s {t2 - t1:.3f} bwd_err {gerr:.3g}", flush=True)
print("phase done", flush=True)
"""


def _case(dtype: str, L: int, stages: int, deadline: float) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, dtype, str(L), str(stages)],
                              capture_output=True, text=True, timeout=deadline, env=env)
        out, rc = proc.stdout, proc.returncode
        tail = proc.stderr.strip().splitlines()[-1:] if rc else []
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, tail = "timeout", []
    res = {"dtype": dtype, "L": L, "stages": stages, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
           "error": tail[0] if tail else None}
    for line in out.splitlines():
        key, _, val = line.partition(" ")
        if key == "phase":
            res["reached"] = val
        else:
            parts = line.split()
            res.update({parts[i]: float(parts[i + 1]) for i in range(0, len(parts) - 1, 2)})
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--deadline", type=float, default=40.0, help="seconds per case")
    ap.add_argument("--lengths", default="7,200")
    ap.add_argument("--stages", default="1,3")
    ap.add_argument("--parallel", type=int, default=4)
    args = ap.parse_args(argv)
    cases = [(d, int(L), int(s)) for d in ("fp32", "bf16") for L in args.lengths.split(",")
             for s in args.stages.split(",")]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda c: _case(*c, args.deadline), cases))
    for r in results:
        print(f"{r['dtype']} L={r['L']:<4} stages={r['stages']} rc={r['rc']!s:<8} reached={r.get('reached')!s:<5} "
              f"fwd {r.get('fwd_s', '-')} s err {r.get('fwd_err', '-')}  bwd {r.get('bwd_s', '-')} s "
              f"err {r.get('bwd_err', '-')}  {r['error'] or ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
