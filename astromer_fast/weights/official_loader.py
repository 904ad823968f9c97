"""Build our model from the authors' released TensorFlow checkpoints, and the one `load_model`
entry point that the CLI and `embed` use for any kind of weights."""

from __future__ import annotations

from pathlib import Path

from astromer_fast.weights.pretrained import (
    CONFIG_NAME,
    WeightsError,
    from_pretrained,
    load_state_checked,
)


def load_official_checkpoint(path, *, config=None, require_head: bool = True,
                             require_token: bool = True, device="cpu", verify_crc: bool = True):
    """Load a released Astromer checkpoint (the ``.zip`` as released, the folder inside it, or the
    ``weights`` prefix) into our PyTorch model, in eval mode.

    The architecture (blocks, FFN width, leak projections, MASK token) is read off the checkpoint's
    own variables, so Astromer 1 and Astromer 2 releases both load without arguments; the mask
    rule follows from it (v1, no skip projections: +1 on query-or-key hidden pairs; v2: -1e9 on
    hidden keys). Pass ``config`` to insist on a layout: a checkpoint that does not match it is
    refused, naming every missing or mis-shaped variable. The authors' classifier checkpoints carry
    neither the regression head nor the MASK token (their classifier never masks): load them with
    ``require_head=False, require_token=False``; the head keeps its fresh initialisation and the
    token its initial value 0.
    """
    import torch

    from astromer_fast.model import Astromer, AstromerConfig
    from astromer_fast.weights.official import (
        infer_architecture,
        official_name_map,
        official_state_dict,
    )
    from astromer_fast.weights.tf_checkpoint import read_checkpoint, read_index

    index = read_index(path)
    arch = infer_architecture({name: info.shape for name, info in index.items()})
    if config is None:
        # Skip projections are what tells the generations apart: a v2 classifier has no token.
        v2 = arch["use_leak"]
        preset = AstromerConfig.astromer2 if v2 else AstromerConfig.astromer1
        config = preset(n_blocks=arch["n_blocks"], dff=arch["dff"], d_model=arch["d_model"],
                        use_leak=v2, use_token=v2 and (arch["use_token"] or not require_token))
    layout = dict(n_blocks=config.n_blocks, dff=config.dff, d_model=config.d_model,
                  use_leak=config.use_leak, use_token=config.use_token, require_head=require_head,
                  require_token=require_token)
    names = official_name_map(index, **layout)  # raises, naming what is missing or mis-shaped
    variables = read_checkpoint(path, names=sorted(official for official, _ in names.values()),
                                verify_crc=verify_crc)
    state = {k: torch.from_numpy(v.copy()) for k, v in
             official_state_dict(variables, **layout).items()}
    model = Astromer(config)
    if not require_head and "head.proj.weight" not in state:
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    load_state_checked(model, state, source=str(path))
    model.pretrained_info = {"path": str(path), "format": "tensorflow-checkpoint",
                             "architecture": arch}
    return model.to(device).eval()


def load_model(spec=None, *, device="cpu"):
    """Any model a user may name: an ``Astromer`` (returned as is), a directory written by
    ``save_pretrained``, a released TensorFlow checkpoint (zip, folder or prefix), or ``None`` /
    a packaged model name for the weights shipped inside the package."""
    from astromer_fast.model import Astromer

    if isinstance(spec, Astromer):
        return spec.to(device).eval()
    from astromer_fast.weights.packaged import packaged_model_path

    packaged = packaged_model_path(spec)
    if packaged is not None:
        return from_pretrained(packaged, device=device)
    path = Path(spec)
    if not path.exists() and not Path(str(path) + ".index").exists():
        raise WeightsError(f"{spec}: no such model; give a directory written by save_pretrained, "
                           f"a released TensorFlow checkpoint (.zip or folder), or a packaged name")
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return from_pretrained(path, device=device)
    return load_official_checkpoint(path, device=device)
