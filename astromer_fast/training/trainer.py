"""Masked-reconstruction training: pretraining and finetuning share this loop.

Per epoch, one random 200-observation window per curve (prepared on a worker thread while the
previous epoch trains); batches of similar lengths, cut to their longest window; SPEC section 4's
probed / same / random / masked composition generated on the training device; the official weighted
RMSE (through the fused kernel); Adam(0.9, 0.98, 1e-9) as the official code (AdamW optional);
linear warm-up then cosine decay (post-LayerNorm transformers diverge without warm-up); bf16
autocast on CUDA; gradient clipping; validation RMSE/R² on the probed subset of fixed held-out
windows; early stopping; checkpoints that resume exactly; ``metrics.csv`` and a learning-curve PNG.

Exact resume: everything random is a function of (seed, epoch) or (seed, step) — the epoch's
windows and batch order, each step's masks — except dropout, whose RNG state is checkpointed. A run
resumed from step k therefore takes the same steps as one that never stopped.

Data parallel: started under ``torchrun`` (or with a process group already initialised), every rank
draws the same global batch and trains on its share; the loss is combined so that the gradient
equals that of one process on the whole batch (the RMSE is not a mean over windows, so plain
gradient averaging would not be exact).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from astromer_fast.training.checkpoint import (  # noqa: F401 - names this module exported
    CHECKPOINT_DIR,
    CheckpointError,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from astromer_fast.training.data import TrainingCurves, epoch_windows, length_batches
from astromer_fast.training.distributed import _dist, setup_distributed  # noqa: F401
from astromer_fast.training.logs import plot_learning_curve, write_metrics_csv
from astromer_fast.training.loss import probed_metrics, weighted_rmse
from astromer_fast.training.masking import MaskFractions, masked_inputs, step_generator

_LOSS_EPS = 1e-12  # inside the op's sqrt (see astromer_fast.kernels.weighted_rmse)
GPU_TRAIN_PATHS = ("fused", "plain")
GPU_TRAIN_PATH_ENV = "ASTROMER_FAST_GPU_TRAIN_PATH"


@dataclass
class TrainSettings:
    """Every knob of the loop; saved with each checkpoint and in the model's metadata."""

    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" (official) or "adamw"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-9
    warmup_steps: int = 500
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr at the step budget) or "constant"
    min_lr_ratio: float = 0.1
    clip_norm: float = 1.0
    max_epochs: int | None = None
    max_steps: int | None = None
    max_minutes: float | None = None
    patience: int | None = 10  # validations without improvement before stopping (None: never)
    val_fraction: float = 0.05
    val_every: int = 200  # steps between validations
    val_max_windows: int = 8192
    checkpoint_every: int = 1000  # steps between resumable checkpoints (and at every stop)
    seed: int = 0
    probed_frac: float = 0.5
    same_frac: float = 0.2
    random_frac: float = 0.2
    # None: bf16 autocast on CUDA; on the CPU bf16 where it has native bfloat16 arithmetic.
    bf16: bool | None = None
    # Kernel backend (None: the device's default); "sdpa": PyTorch with torch's fused attention.
    backend: str | None = None
    sdpa: bool = False  # deprecated: the old spelling of backend="sdpa"
    # On the CPU, the encoder through the fused passes (astromer_fast.model.fused_cpu) when the
    # model's shape allows and no backend asks for the plain model.
    cpu_fused: bool = True
    # The encoder of a CUDA training step: "plain" (the model under bf16 autocast with the kernel
    # backends) or "fused" (astromer_fast.model.fused_gpu_train: weights cast once per step, one
    # GEMM for q, k, v and the first skip, one for the feed-forward input and the second skip).
    # None: $ASTROMER_FAST_GPU_TRAIN_PATH, else "plain": the fused path has not been timed on a
    # GPU yet. A value given here also applies on the CPU ("fused" is how its tests run it there),
    # instead of the CPU's fused passes.
    gpu_path: str | None = None
    length_group: int = 16  # batches sorted together by length within a shuffled span
    max_bad_steps: int = 20  # consecutive non-finite steps before giving up
    # Forward, loss and backward replayed from one CUDA graph per batch shape
    # (astromer_fast.training.cuda_graphs); eager steps, said once, where that cannot run.
    cuda_graphs: bool = False

    def __post_init__(self):
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.sdpa:
            if self.backend not in (None, "torch", "sdpa"):
                raise ValueError(f"sdpa=True (deprecated: backend='sdpa') contradicts "
                                 f"backend={self.backend!r}")
            warnings.warn("TrainSettings(sdpa=True) is deprecated; use backend='sdpa'",
                          DeprecationWarning, stacklevel=3)
            self.backend, self.sdpa = "sdpa", False
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        if self.gpu_path not in (None,) + GPU_TRAIN_PATHS:
            raise ValueError(f"gpu_path must be one of {GPU_TRAIN_PATHS} or None (the default), "
                             f"got {self.gpu_path!r}")
        self.fractions()  # validates them

    def fractions(self) -> MaskFractions:
        return MaskFractions(self.probed_frac, self.same_frac, self.random_frac)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list = field(default_factory=list)
    best: dict | None = None
    stopped: str = ""
    out_dir: Path | None = None


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------
def _batch_tensors(w, idx, device, pin: bool, multiple: int = 16):
    """Host arrays of windows ``idx`` cut to their longest window (rounded up to ``multiple``:
    fewer distinct shapes for kernel caches, aligned tiles) -> device tensors."""
    longest = max(int(w.n_valid[idx].max()), 1)
    width = min(w.t.shape[1], -(-longest // multiple) * multiple)
    out = {}
    for name in ("t", "m", "err", "valid"):
        a = torch.from_numpy(np.ascontiguousarray(getattr(w, name)[idx, :width]))
        if pin:
            a = a.pin_memory()
        out[name] = a.to(device, non_blocking=pin)
    return out


def masked_batch(w, idx, fr: MaskFractions, generator, device, pin=False) -> dict:
    """The tensors of one training step: inputs with masks, targets, errors, probed mask."""
    b = _batch_tensors(w, idx, device, pin)
    m_in, hidden, probed = masked_inputs(b["m"], b["valid"], fr, generator)
    return dict(t=b["t"], m_in=m_in, hidden=hidden, target=b["m"], err=b["err"], probed=probed,
                valid=b["valid"])


def gpu_train_path(s: TrainSettings, device) -> str | None:
    """``"fused"`` or ``"plain"``: the encoder ``TrainSettings.gpu_path`` (else, on CUDA,
    ``$ASTROMER_FAST_GPU_TRAIN_PATH``) asks for on ``device``; None on a CPU where neither asks
    (the CPU's own choice, see ``uses_cpu_fused``)."""
    if s.gpu_path is not None:
        return s.gpu_path
    if torch.device(device).type != "cuda":
        return None
    env = os.environ.get(GPU_TRAIN_PATH_ENV, "").strip()
    if env in ("", "auto"):
        return "plain"
    if env not in GPU_TRAIN_PATHS:
        raise ValueError(f"${GPU_TRAIN_PATH_ENV}={env!r}: choose one of {GPU_TRAIN_PATHS} "
                         f"(or leave it unset)")
    return env


def uses_cpu_fused(model, s: TrainSettings, device) -> bool:
    """Whether training on ``device`` runs the fused CPU encoder (see TrainSettings.cpu_fused)."""
    from astromer_fast.model.fused_cpu import fused_cpu_unsupported

    return (torch.device(device).type == "cpu" and s.cpu_fused and s.backend in (None, "cpu")
            and gpu_train_path(s, device) is None
            and fused_cpu_unsupported(model.config) is None)


ENCODERS = ("plain", "cpu_fused", "fused_train")


def training_encoder(model, s: TrainSettings, device) -> str:
    """The encoder a training step on ``device`` runs, one of ``ENCODERS``: the fused CPU passes,
    the fused training forward (``gpu_path="fused"``) or the plain model."""
    if gpu_train_path(s, device) == "fused":
        return "fused_train"
    return "cpu_fused" if uses_cpu_fused(model, s, device) else "plain"


def uses_bf16(s: TrainSettings, device) -> bool:
    from astromer_fast.model.fused_cpu import resolve_precision

    if s.bf16 is not None:
        return bool(s.bf16)
    return torch.device(device).type == "cuda" or resolve_precision() == "bf16"


def _param_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _forward_loss(model, b, s: TrainSettings, use_bf16: bool, encoder: str = "plain",
                  loss_fn=None):
    """(prediction, loss) of batch ``b``; ``loss_fn`` replaces the weighted RMSE op (the CUDA
    graphs' capturable formulation)."""
    # The fused encoders hold their own precision: no autocast around them.
    if encoder == "cpu_fused":
        pred = model(b["t"], b["m_in"], b["hidden"], cpu_fused="bf16" if use_bf16 else "fp32")
    elif encoder == "fused_train":
        pred = model(b["t"], b["m_in"], b["hidden"], backend=s.backend,
                     fused_train=torch.bfloat16 if use_bf16 else _param_dtype(model))
    else:
        with torch.autocast(device_type=b["t"].device.type, dtype=torch.bfloat16,
                            enabled=use_bf16):
            pred = model(b["t"], b["m_in"], b["hidden"], backend=s.backend)
    pred = pred.float()
    if loss_fn is not None:
        return pred, loss_fn(pred, b["target"], b["err"], b["probed"], b["valid"])
    loss = weighted_rmse(pred, b["target"], b["err"], b["probed"], b["valid"], backend=s.backend)
    return pred, loss


@torch.no_grad()
def evaluate(model, w, s: TrainSettings, device, use_bf16: bool, batch_size: int = 1024,
             encoder: str = "plain") -> dict:
    """Validation loss (the weighted RMSE over all windows) and unweighted RMSE/R² pooled over
    the probed observations, on fixed windows with fixed masks (every evaluation sees the same
    task, so values are comparable across steps)."""
    was_training = model.training
    model.eval()
    fr = s.fractions()
    g = step_generator(s.seed + 99_991, 0, device)
    sq = torch.zeros((), dtype=torch.float64, device=device)
    nh = 0
    ys, yhs = [], []
    n = len(w.n_valid)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        b = masked_batch(w, idx, fr, g, device)
        pred, loss = _forward_loss(model, b, s, use_bf16, encoder)
        has = int((b["probed"].sum(-1) > 0).sum())
        sq += (loss.double() ** 2 - _LOSS_EPS) * has
        nh += has
        ys.append(b["target"][b["probed"]])
        yhs.append(pred[b["probed"]])
    model.train(was_training)
    y, yh = torch.cat(ys), torch.cat(yhs)
    met = probed_metrics(yh[None], y[None], torch.ones_like(y, dtype=torch.bool)[None])
    met["loss"] = float(torch.sqrt(sq / max(nh, 1)))
    return met


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def _lr_lambda(s: TrainSettings, total_steps: int | None):
    def f(step):
        warm = min(1.0, (step + 1) / max(1, s.warmup_steps)) if s.warmup_steps else 1.0
        if s.schedule == "constant" or not total_steps:
            return warm
        prog = min(1.0, step / max(1, total_steps))
        return warm * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))

    return f


@dataclass(frozen=True)
class TrainProgress:
    """Where a run is, as ``on_step`` sees it after each step."""

    step: int
    epoch: int
    batch_in_epoch: int
    windows: int
    seconds: float
    history: list
    best: dict | None


def train(model, train_curves: TrainingCurves, val_curves: TrainingCurves | None, out_dir=None,
          *, settings: TrainSettings | None = None, resume: bool = False, device=None,
          log=print, metadata: dict | None = None, on_step=None) -> TrainResult:
    """Train ``model`` with the masked objective. Writes into ``out_dir`` (when given): the best
    model by validation loss (``save_pretrained``), ``checkpoint/`` (resumable), ``metrics.csv``
    and ``learning_curve.png``. ``resume=True`` continues from ``out_dir/checkpoint``.
    ``on_step(progress)``, if given, is called after every step with a :class:`TrainProgress`
    (custom logging, or to stop a run: an exception raised there propagates, like an
    interruption)."""
    s = settings or TrainSettings()
    rank, world, dev = setup_distributed(device)
    is_main = rank == 0
    log = log if (is_main and log) else (lambda *a, **k: None)
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None and is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if len(train_curves) == 0:
        raise ValueError("no training curves left after cleaning and filtering")

    # Model, optimizer, schedule.
    torch.manual_seed(s.seed)
    model = model.to(dev).train()
    use_bf16 = uses_bf16(s, dev)
    encoder = training_encoder(model, s, dev)
    fr = s.fractions()
    opt = _make_optimizer(model, s, dev)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s, _step_budget(s, train_curves)))
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda"
                                            else None)
    val_w = _validation_windows(val_curves, s)
    graphed = _graphed_steps(model, s, dev, world, use_bf16, encoder, log)

    # The loop's position: what a checkpoint records and a resumed run starts from.
    step = epoch = batch_in_epoch = windows = 0
    seconds = 0.0
    best = None  # the validation row of the best model so far
    bad_validations = 0  # validations in a row without improvement
    bad_steps = 0  # non-finite steps in a row
    history = []  # one row per validation
    run_loss_sum, run_n = 0.0, 0  # training loss since the last validation
    ckpt_dir = out_dir / CHECKPOINT_DIR if out_dir is not None else None
    if resume:
        if ckpt_dir is None or not ckpt_dir.exists():
            raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}")
        doc = restore_checkpoint(ckpt_dir, model, opt, sched, dev)
        step, epoch = doc.get("step", 0), doc.get("epoch", 0)
        batch_in_epoch, windows = doc.get("batch_in_epoch", 0), doc.get("windows", 0)
        seconds, best = doc.get("seconds", 0.0), doc.get("best")
        bad_validations, bad_steps = doc.get("bad_validations", 0), doc.get("bad_steps", 0)
        history = doc.get("history", [])
        run_loss_sum, run_n = doc.get("run_loss", 0.0), doc.get("run_n", 0)
        log(f"resumed from {ckpt_dir} at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    pin = dev.type == "cuda"
    t_start = time.perf_counter() - seconds
    deadline = None if not s.max_minutes else time.perf_counter() + 60 * s.max_minutes
    # Kept on the device: no sync per step.
    run_loss = torch.full((), float(run_loss_sum), device=dev)
    run_n = int(run_n)
    rate_since = (time.perf_counter(), windows)  # for windows/s between validations
    stopped = ""

    def save_checkpoint_now():
        if ckpt_dir is None or not is_main:
            return
        save_checkpoint(ckpt_dir, model=model, opt=opt, sched=sched, settings=s, trainer_state=dict(
            step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, windows=windows,
            seconds=time.perf_counter() - t_start, best=best, bad_validations=bad_validations,
            history=history, bad_steps=bad_steps, run_loss=float(run_loss), run_n=run_n))

    def validate_now(train_loss):
        """Validate, log and keep the row; save the model when it is the best so far."""
        nonlocal best, bad_validations, rate_since
        now = time.perf_counter()
        rate = (windows - rate_since[1]) / max(now - rate_since[0], 1e-9)
        row = dict(step=step, epoch=epoch, windows=windows, seconds=round(now - t_start, 2),
                   lr=sched.get_last_lr()[0], train_loss=train_loss,
                   windows_per_s=round(rate, 1))
        if val_w is not None:  # every rank, so that every rank takes the same stop decision
            met = evaluate(model, val_w, s, dev, use_bf16, encoder=encoder)
            row.update(val_loss=met["loss"], val_rmse=met["rmse"], val_r2=met["r2"])
        history.append(row)
        log(json.dumps(row))
        improved = val_w is not None and (best is None or row["val_loss"] < best["val_loss"])
        if improved:
            best, bad_validations = dict(row), 0
        elif val_w is not None:
            bad_validations += 1
        if out_dir is not None and is_main:
            if improved or val_w is None:
                _save_model(model, out_dir, row, s, metadata, dev)
            write_metrics_csv(history, out_dir / "metrics.csv")
        rate_since = (time.perf_counter(), windows)

    pool = ThreadPoolExecutor(max_workers=1)  # the next epoch's windows, while this one trains
    next_epoch = pool.submit(_epoch_batches, train_curves, s, epoch)
    try:
        while not stopped:
            w, batches = next_epoch.result()
            if s.max_epochs is None or epoch + 1 < s.max_epochs:
                next_epoch = pool.submit(_epoch_batches, train_curves, s, epoch + 1)
            for bi in range(batch_in_epoch, len(batches)):
                idx = batches[bi]
                # Every rank draws the same global batch and masks, then keeps its rows: the run
                # is the same computation on 1 or N processes.
                b = masked_batch(w, idx, fr, step_generator(s.seed, step, dev), dev, pin)
                if world > 1:
                    b = {k: (v[rank::world] if v is not None else None) for k, v in b.items()}
                if graphed is not None:  # the gradient is already in .grad
                    loss_value = graphed.step(b)
                else:
                    _, loss = _forward_loss(ddp_model, b, s, use_bf16, encoder)
                    if world > 1:
                        loss_for_grad, loss_value = _global_loss(loss, b["probed"], world, dev)
                    else:
                        loss_for_grad = loss_value = loss
                    opt.zero_grad(set_to_none=True)
                    loss_for_grad.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_norm)
                if torch.isfinite(norm) and torch.isfinite(loss_value):
                    bad_steps = 0
                    opt.step()
                    run_loss += loss_value.detach()
                    run_n += 1
                    sched.step()
                else:  # NaN/inf gradients: refuse the update rather than poison the weights
                    bad_steps += 1
                    log(f"step {step}: non-finite loss or gradient; update refused "
                        f"({bad_steps} in a row)")
                    if bad_steps >= s.max_bad_steps:
                        raise FloatingPointError(
                            f"{bad_steps} consecutive non-finite steps at step {step}: check "
                            f"the data (NaN/inf/zero errors) and the lr")
                    opt.zero_grad(set_to_none=True)
                    with warnings.catch_warnings():  # the schedule follows steps, taken or not
                        warnings.simplefilter("ignore", UserWarning)
                        sched.step()
                step += 1
                batch_in_epoch = bi + 1
                windows += len(idx)

                out_of_time = deadline is not None and time.perf_counter() > deadline
                if deadline is not None and world > 1:  # ranks' clocks differ: rank 0 decides
                    out_of_time = _broadcast_flag(out_of_time, dev)
                out_of_steps = s.max_steps is not None and step >= s.max_steps
                if step % s.val_every == 0 or out_of_time or out_of_steps:
                    train_loss = float(run_loss / max(run_n, 1))
                    run_loss.zero_()
                    run_n = 0
                    validate_now(train_loss)
                    if s.patience is not None and bad_validations >= s.patience:
                        stopped = f"early stop: no improvement in {s.patience} validations"
                if out_of_time and not stopped:
                    stopped = f"time budget of {s.max_minutes} min reached"
                if out_of_steps and not stopped:
                    stopped = f"step budget of {s.max_steps} reached"
                if stopped or step % s.checkpoint_every == 0:
                    save_checkpoint_now()
                if on_step is not None:
                    on_step(TrainProgress(step, epoch, batch_in_epoch, windows,
                                          time.perf_counter() - t_start, history, best))
                if stopped:
                    break
            else:  # the epoch is over
                epoch += 1
                batch_in_epoch = 0
                if s.max_epochs is not None and epoch >= s.max_epochs:
                    if not history or history[-1]["step"] != step:
                        validate_now(float(run_loss / max(run_n, 1)))
                    stopped = f"epoch budget of {s.max_epochs} reached"
                    save_checkpoint_now()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    log(f"stopped: {stopped} at step {step} after {time.perf_counter() - t_start:.1f} s")
    if out_dir is not None and is_main and history:
        try:
            plot_learning_curve(history, out_dir / "learning_curve.png")
        except ImportError:
            log("matplotlib not installed: learning_curve.png not written (pip install "
                "'astromer-fast[plot]')")
    return TrainResult(model, history, best, stopped, out_dir)


# ------------------------------------------------------------------------------------------------
# What the loop calls
# ------------------------------------------------------------------------------------------------
def _step_budget(s: TrainSettings, train_curves: TrainingCurves) -> int | None:
    """Steps the cosine schedule spans: max_steps, or max_epochs worth of batches; None (a
    constant rate after warm-up) when only a wall-clock budget bounds the run."""
    steps_per_epoch = math.ceil(len(train_curves) / s.batch_size)
    return s.max_steps or (s.max_epochs * steps_per_epoch if s.max_epochs else None)


def _graphed_steps(model, s: TrainSettings, dev, world: int, use_bf16: bool, encoder: str, log):
    """The CUDA-graph runner of the training steps, or None (not asked, or cannot run: said)."""
    if not s.cuda_graphs:
        return None
    from astromer_fast.training.cuda_graphs import (
        GraphedSteps,
        cuda_graphs_unavailable,
        graph_safe_weighted_rmse,
    )

    why = cuda_graphs_unavailable(dev, world)
    if why is not None:
        log(f"cuda_graphs: {why}; eager steps")
        return None
    return GraphedSteps(model, lambda b: _forward_loss(
        model, b, s, use_bf16, encoder, loss_fn=graph_safe_weighted_rmse)[1], log=log)


def _make_optimizer(model, s: TrainSettings, dev):
    kw = dict(lr=s.lr, betas=(s.beta1, s.beta2), eps=s.eps, weight_decay=s.weight_decay)
    if dev.type == "cuda":
        kw["fused"] = True
    return (torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam)(
        model.parameters(), **kw)


def _validation_windows(val_curves: TrainingCurves | None, s: TrainSettings):
    """Fixed held-out windows (at most val_max_windows), or None without validation curves."""
    if val_curves is None or not len(val_curves):
        return None
    w = epoch_windows(val_curves.curves, s.seed + 777)
    if len(w.n_valid) > s.val_max_windows:
        keep = np.random.default_rng(s.seed).choice(len(w.n_valid), s.val_max_windows,
                                                    replace=False)
        w = _take_windows(w, np.sort(keep))
    return w


def _epoch_batches(train_curves: TrainingCurves, s: TrainSettings, epoch: int):
    """(windows, batches) of an epoch: a function of (seed, epoch) only, so resume is exact."""
    seed = s.seed * 100_003 + epoch
    w = epoch_windows(train_curves.curves, seed)
    return w, length_batches(w.n_valid, s.batch_size, seed + 1, s.length_group)


def _broadcast_flag(flag: bool, dev) -> bool:
    """Rank 0's value of ``flag`` on every rank."""
    t = torch.tensor([float(flag)], device=dev)
    _dist().broadcast(t, 0)
    return bool(t.item())


def _save_model(model, out_dir: Path, row: dict, s: TrainSettings, metadata: dict | None, dev):
    model.save_pretrained(out_dir, metadata={
        "training": asdict(s), **(metadata or {}), "step": row["step"],
        "val_loss": row.get("val_loss"), "val_rmse": row.get("val_rmse"),
        "val_r2": row.get("val_r2"), "device": str(dev), "windows_seen": row["windows"]})


def _global_loss(local_loss, probed, world, dev):
    """The whole-batch RMSE across ranks and a surrogate whose gradient, after DDP's averaging,
    equals the whole-batch gradient: loss = sqrt(S / N), S = sum over ranks of sum_b mse_b."""
    import torch.distributed as dist

    n_local = (probed.sum(-1) > 0).sum().to(torch.float64)
    s_local = (local_loss.double() ** 2 - _LOSS_EPS) * n_local
    tot = torch.stack([s_local.detach(), n_local])
    dist.all_reduce(tot)
    S, N = tot[0], tot[1].clamp_min(1)
    L = torch.sqrt(S / N + _LOSS_EPS)
    surrogate = (world * s_local / (2 * L * N)).float()
    return surrogate, L.float()


def _take_windows(w, idx):
    from dataclasses import replace

    arrays = {k: getattr(w, k)[idx] for k in ("t", "m", "err", "valid", "curve", "start",
                                              "n_valid", "t_mean", "m_mean")
              if getattr(w, k) is not None}
    return replace(w, **arrays)
