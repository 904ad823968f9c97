"""Resumable training checkpoints: one folder holding the model, the optimizer, the learning-rate
schedule, the RNG states and the trainer's own state, written atomically (a temporary folder
renamed over the old one) and checked before it is used, so a bad folder is a clear
``CheckpointError`` and never a half-restored run."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from astromer_fast.training.trainer import TrainSettings

CHECKPOINT_DIR = "checkpoint"


class CheckpointError(ValueError):
    """A training checkpoint that is missing, incomplete, corrupt or from another run."""


def _optimizer_tensors(opt) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt, tensors: dict, meta: dict):
    state = {}
    for name, v in tensors.items():
        _, pid, k = name.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(directory, *, model, opt, sched, trainer_state: dict, settings: TrainSettings):
    """Write a resumable checkpoint atomically (a temporary folder renamed over the old one):
    weights and config (safetensors + JSON), optimizer state (safetensors + JSON), RNG states,
    and the loop's position, with sha256 of every file so corruption is detected on load."""
    from safetensors.torch import save_file

    from astromer_fast.weights.pretrained import file_sha256

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tens, meta = _optimizer_tensors(opt)
    save_file(tens, str(tmp / "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda{i}"] = st
    save_file(rng, str(tmp / "rng.safetensors"))
    files = ["model.safetensors", "config.json", "optimizer.safetensors", "rng.safetensors"]
    doc = {"format": "astromer_fast.train_checkpoint", "version": 1,
           "settings": asdict(settings), "optimizer": meta,
           "scheduler": sched.state_dict() if sched is not None else None,
           **trainer_state, "sha256": {f: file_sha256(tmp / f) for f in files}}
    (tmp / "trainer.json").write_text(json.dumps(doc, indent=1, default=_json_default))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)
    return directory


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_checkpoint(directory) -> dict:
    """Validate a checkpoint folder and return its trainer document (raises CheckpointError)."""
    from astromer_fast.weights.pretrained import file_sha256

    directory = Path(directory)
    doc_path = directory / "trainer.json"
    if not doc_path.is_file():
        raise CheckpointError(f"{directory}: not a training checkpoint (no trainer.json)")
    try:
        doc = json.loads(doc_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{doc_path}: unreadable ({e})") from None
    if doc.get("format") != "astromer_fast.train_checkpoint":
        raise CheckpointError(f"{doc_path}: not an astromer_fast training checkpoint")
    for name, digest in doc.get("sha256", {}).items():
        p = directory / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing from the checkpoint")
        if file_sha256(p) != digest:
            raise CheckpointError(f"{p}: corrupt (sha256 differs from the one recorded when "
                                  "the checkpoint was written)")
    return doc


def restore_checkpoint(directory, model, opt, sched, device) -> dict:
    from safetensors.torch import load_file

    from astromer_fast.weights.pretrained import from_pretrained, load_state_checked

    doc = read_checkpoint(directory)
    try:
        saved = from_pretrained(directory)
        load_state_checked(model, saved.state_dict(), source=str(directory))
        _load_optimizer(opt, load_file(str(Path(directory) / "optimizer.safetensors"),
                                       device=str(device)), doc["optimizer"])
        rng = load_file(str(Path(directory) / "rng.safetensors"))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means the checkpoint is unusable
        raise CheckpointError(f"{directory}: cannot restore the checkpoint ({e})") from e
    if sched is not None and doc.get("scheduler") is not None:
        sched.load_state_dict(doc["scheduler"])
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])
    return doc
