"""The two entry points users call: ``pretrain`` (from scratch or from weights, on any Parquet the
embedder reads) and ``finetune`` (continue the masked objective on a labelled set, as the paper does
before classification). Both run ``astromer_fast.training.trainer.train``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from astromer_fast.training.data import (
    CurveFilter,
    TrainingCurves,
    load_training_curves,
    select_training_curves,
)
from astromer_fast.training.trainer import TrainResult, TrainSettings, train

# Finetuning continues a trained model: a smaller learning rate, a short warm-up, no paper filter
# (labelled sets are small and every curve counts).
FINETUNE_DEFAULTS = dict(lr=1e-4, warmup_steps=50, val_every=50, patience=5, max_epochs=20,
                         batch_size=128, checkpoint_every=500)


def _load_model(model, *, default_packaged: bool = False):
    """A model to train: as given; loaded by name or path (``load_model``, whose ``None`` is the
    packaged default); or, for ``None`` without ``default_packaged``, a fresh Astromer 2."""
    from astromer_fast.model import Astromer
    from astromer_fast.weights.official_loader import load_model

    if model is None and not default_packaged:
        return Astromer()
    return load_model(model) if model is None or isinstance(model, (str, Path)) else model


def pretrain(sources, out_dir, *, model=None, settings: TrainSettings | None = None,
             resume: bool = False, curve_filter: CurveFilter | None = CurveFilter(),
             exclude_split: str | None = "test", bands=None, min_obs: int = 5,
             device=None, log=print, on_step=None, **layout_kw) -> TrainResult:
    """Pretrain ``model`` (default: a fresh Astromer 2; or a name/path/model to continue from)
    on the curves of ``sources`` (Parquet path(s), glob, directory, or an Arrow table), holding out
    ``settings.val_fraction`` of the curves for validation. Writes into ``out_dir``: the best model
    (``config.json`` + ``model.safetensors``), ``checkpoint/`` for ``resume=True``, ``metrics.csv``
    and ``learning_curve.png``."""
    s = settings or TrainSettings()
    table = sources if isinstance(sources, pa.Table) else None
    data = load_training_curves(None if table is not None else sources, table=table,
                                exclude_split=exclude_split, bands=bands, min_obs=min_obs,
                                curve_filter=curve_filter, log=log, **layout_kw)
    tr, va = data.split(s.val_fraction, s.seed)
    if log:
        log(f"{len(tr)} training curves, {len(va)} validation curves, "
            f"{int(tr.curves.lengths.sum())} training observations")
    meta = {"data": {"files": data.files, "curves": data.counts, "train_curves": len(tr),
                     "val_curves": len(va), "exclude_split": exclude_split,
                     "curve_filter": None if curve_filter is None else vars(curve_filter)}}
    return train(_load_model(model), tr, va, out_dir, settings=s, resume=resume, device=device,
                 log=log, metadata=meta, on_step=on_step)


def finetune(model, curves, settings: TrainSettings | None = None, out_dir=None, *,
             val_curves=None, resume: bool = False, device=None, log=None,
             **layout_kw) -> TrainResult:
    """Continue masked-reconstruction training of ``model`` on ``curves`` (an
    ``astromer_fast.data.Curves``, a ``TrainingCurves``, an Arrow table or Parquet path(s) in any
    layout the embedder reads). With no ``val_curves``, ``settings.val_fraction`` of the curves are
    held out. Defaults: ``FINETUNE_DEFAULTS`` (lr 1e-4, 20 epochs, early stopping). Returns a
    ``TrainResult`` whose ``.model`` is the finetuned model (the best validation state when a
    validation set exists and ``out_dir`` is given, else the last)."""
    from astromer_fast.data import Curves

    s = settings or TrainSettings(**FINETUNE_DEFAULTS)
    model = _load_model(model, default_packaged=True)
    if isinstance(curves, TrainingCurves):
        data = curves
    elif isinstance(curves, Curves):
        n = len(curves)
        data = select_training_curves(curves, np.arange(n).astype(object), np.zeros(n, np.int64),
                                      ["<curves>"])
    else:
        table = curves if isinstance(curves, pa.Table) else None
        data = load_training_curves(None if table is not None else curves, table=table,
                                    exclude_split=None, curve_filter=None, log=log, **layout_kw)
    if val_curves is None:
        tr, va = data.split(s.val_fraction, s.seed)
    else:
        tr, va = data, val_curves
    result = train(model, tr, va, out_dir, settings=s, resume=resume, device=device, log=log,
                   metadata={"finetune": True, "train_curves": len(tr)})
    if out_dir is not None and result.best is not None:
        from astromer_fast.weights.pretrained import from_pretrained, load_state_checked

        best = from_pretrained(out_dir)
        load_state_checked(result.model, best.state_dict(), source=str(out_dir))
    return result


def finetune_settings(**overrides) -> TrainSettings:
    return replace(TrainSettings(**FINETUNE_DEFAULTS), **overrides)
