"""Loading and saving weights: our safetensors format and the released TensorFlow checkpoints."""

from astromer_fast.weights.official_loader import load_model, load_official_checkpoint
from astromer_fast.weights.pretrained import WeightsError, from_pretrained, save_pretrained

__all__ = ["WeightsError", "from_pretrained", "load_model", "load_official_checkpoint",
           "save_pretrained"]
