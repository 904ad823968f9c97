"""Masked-reconstruction training (pretraining and finetuning) of Astromer models."""

from astromer_fast.training.data import CurveFilter, TrainingCurves, load_training_curves
from astromer_fast.training.loss import error_weights, probed_metrics, weighted_rmse
from astromer_fast.training.masking import MaskFractions, masked_inputs
from astromer_fast.training.pretrain import FINETUNE_DEFAULTS, finetune, finetune_settings, pretrain
from astromer_fast.training.trainer import (
    CheckpointError,
    TrainProgress,
    TrainResult,
    TrainSettings,
    plot_learning_curve,
    read_checkpoint,
    train,
)

# Older name of the settings class (the preview model's card refers to it).
PretrainSettings = TrainSettings

__all__ = [
    "CheckpointError", "CurveFilter", "FINETUNE_DEFAULTS", "MaskFractions", "PretrainSettings",
    "TrainProgress", "TrainResult", "TrainSettings", "TrainingCurves", "error_weights", "finetune",
    "finetune_settings", "load_training_curves", "masked_inputs", "plot_learning_curve",
    "pretrain", "probed_metrics", "read_checkpoint", "train", "weighted_rmse",
]
