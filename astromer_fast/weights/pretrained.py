"""Our own weight format: ``model.safetensors`` + ``config.json`` in one directory.

safetensors holds raw tensors only (no pickle, nothing executes on load), so a directory downloaded
from anywhere is safe to open. The JSON config rebuilds the exact module layout before loading.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


class WeightsError(ValueError):
    """A weights directory that cannot be loaded, with the reason."""


def save_pretrained(model, directory, *, metadata: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    from astromer_fast import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    doc = {
        "model_type": "astromer",
        "format_version": FORMAT_VERSION,
        "astromer_fast_version": __version__,
        "config": model.config.to_dict(),
        "metadata": metadata or {},
    }
    (directory / CONFIG_NAME).write_text(json.dumps(doc, indent=2) + "\n")
    return directory


def read_config(directory):
    from astromer_fast.model import AstromerConfig

    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise WeightsError(f"{path}: missing; a pretrained directory holds {CONFIG_NAME} and "
                           f"{WEIGHTS_NAME} (see Astromer.save_pretrained)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("model_type") != "astromer" or "config" not in doc:
        raise WeightsError(f"{path}: not an astromer_fast config (expected model_type 'astromer' "
                           f"and a 'config' object)")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise WeightsError(f"{path}: format_version {doc['format_version']} is newer than this "
                           f"astromer_fast understands ({FORMAT_VERSION}); upgrade the package")
    try:
        return AstromerConfig.from_dict(doc["config"]), doc
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: invalid config: {e}") from None


def from_pretrained(directory, *, device="cpu", dtype: torch.dtype | None = None):
    """Rebuild a model from a directory written by :func:`save_pretrained`, in eval mode.

    Every tensor must match the config's layout exactly: missing, unexpected or mis-shaped tensors
    are refused with their names.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from astromer_fast.model import Astromer

    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"{directory}: not a directory of pretrained weights")
    cfg, doc = read_config(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise WeightsError(f"{path}: missing")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable safetensors file ({e})") from None
    model = Astromer(cfg)
    load_state_checked(model, state, source=str(path))
    model.pretrained_info = {"path": str(directory), "sha256": file_sha256(path),
                             "metadata": doc.get("metadata", {})}
    model.to(device=device, dtype=dtype)
    return model.eval()


def load_state_checked(model, state: dict, *, source: str):
    """load_state_dict with a message that lists every mismatch, not only the first."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
                 for k in sorted(set(expected) & set(state))
                 if tuple(expected[k].shape) != tuple(state[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if misshaped:
        problems.append("mis-shaped tensors [" + "; ".join(misshaped) + "]")
    if problems:
        raise WeightsError(f"{source}: does not match the {model.config.name!r} layout: "
                           + ", ".join(problems))
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
