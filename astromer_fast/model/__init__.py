from astromer_fast.model.astromer import (
    Astromer,
    AstromerConfig,
    EncoderOutput,
    attention_bias,
    masked_mean,
)

__all__ = ["Astromer", "AstromerConfig", "EncoderOutput", "attention_bias", "masked_mean"]
