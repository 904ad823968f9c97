from astromer_fast.training.loss import error_weights, probed_metrics, weighted_rmse
from astromer_fast.training.pretrain import PretrainSettings, pretrain

__all__ = ["PretrainSettings", "error_weights", "pretrain", "probed_metrics", "weighted_rmse"]
