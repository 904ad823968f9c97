"""Whole-model throughput, every variant side by side in one run: windows/s for the embedding
forward and for a training step (forward + backward + Adam), with ratios to eager fp32.

    python bench/bench_model.py                       # CPU: small sizes
    python bench/bench_model.py --device cuda --windows 4096 --json out.json

Variants: the plain PyTorch reference (torch backend, explicit softmax attention) in fp32;
the default fused-kernel backend in fp32; on CUDA, bf16 autocast with SDPA and a key mask; and,
with --compile, torch.compile of the reference.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from astromer_fast import Astromer, AstromerConfig
from astromer_fast.kernels import available_backends
from astromer_fast.training import weighted_rmse

from _timing import device_sync, timed


def make_batch(n, L, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_valid = torch.randint(L // 4, L + 1, (n,), generator=g)  # random padding
    valid = torch.arange(L)[None] < n_valid[:, None]
    t = torch.sort(torch.rand(n, L, generator=g) * 1000 - 500, 1).values * valid
    m = torch.randn(n, L, generator=g) * valid
    err = (torch.rand(n, L, generator=g) * 0.1 + 0.01) * valid
    probed = valid & (torch.rand(n, L, generator=g) < 0.5)
    return [x.to(device) for x in (t, m, valid, err, probed)]


def run(args):
    device = torch.device(args.device)
    sync = device_sync(device)
    t, m, valid, err, probed = make_batch(args.windows, args.length, device)
    hidden = ~valid
    variants = [("reference fp32 (torch backend)", dict(backend="torch"), None, False)]
    for b in available_backends(device):
        if b != "torch":
            variants.append((f"fused {b} fp32", dict(backend=b), None, False))
    if device.type == "cuda":
        variants.append(("reference bf16 + SDPA", dict(backend="torch", use_sdpa=True),
                         torch.bfloat16, False))
        best = available_backends(device)[0]
        variants.append((f"fused {best} bf16 + SDPA", dict(backend=best, use_sdpa=True),
                         torch.bfloat16, False))
    if args.compile:
        variants.append(("reference fp32 torch.compile", dict(backend="torch"), None, True))

    rows = []
    for name, kw, amp, compiled in variants:
        torch.manual_seed(0)
        model = Astromer(AstromerConfig()).to(device)
        enc = torch.compile(model) if compiled else model

        def embed():
            with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32,
                                                 enabled=amp is not None):
                for s in range(0, args.windows, args.batch):
                    sl = slice(s, s + args.batch)
                    enc.encode(t[sl], m[sl], hidden[sl], **kw) if not compiled else \
                        enc(t[sl], m[sl], hidden[sl], **kw)

        opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)

        def train():
            for s in range(0, args.windows, args.batch):
                sl = slice(s, s + args.batch)
                with torch.autocast(device.type, dtype=amp or torch.float32,
                                    enabled=amp is not None):
                    pred = enc(t[sl], m[sl], hidden[sl] | probed[sl], **kw)
                loss = weighted_rmse(pred, m[sl], err[sl], probed[sl], valid[sl])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        model.eval()
        te = timed(embed, sync, args.repeats)
        model.train()
        tt = timed(train, sync, args.repeats) if not args.no_train else float("nan")
        rows.append(dict(variant=name, embed_windows_per_s=args.windows / te,
                         train_windows_per_s=args.windows / tt))
    base_e, base_t = rows[0]["embed_windows_per_s"], rows[0]["train_windows_per_s"]
    print(f"\n{args.windows} windows x {args.length} obs (random padding), batch {args.batch}, "
          f"{device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"{'variant':38s} {'embed win/s':>12s} {'ratio':>7s} {'train win/s':>12s} {'ratio':>7s}")
    for r in rows:
        r["embed_ratio"] = r["embed_windows_per_s"] / base_e
        r["train_ratio"] = r["train_windows_per_s"] / base_t
        print(f"{r['variant']:38s} {r['embed_windows_per_s']:12.1f} {r['embed_ratio']:7.2f} "
              f"{r['train_windows_per_s']:12.1f} {r['train_ratio']:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), windows=args.windows, length=args.length,
                           batch=args.batch, torch=torch.__version__, rows=rows), f, indent=2)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--length", type=int, default=200)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    cuda = a.device.startswith("cuda")
    a.windows = a.windows or (4096 if cuda else 64)
    a.batch = a.batch or (1024 if cuda else 32)
    run(a)
