"""Astromer 2 (and Astromer 1) in plain PyTorch, readable top to bottom.

Every choice below follows ``SPEC.md`` (read from the authors' TensorFlow code and checked numerically
against the released weights); where the paper differs, the code that produced the weights wins.

Inputs of every forward, one row per window of ``L`` observations:
  t       (B, L) float32  time in days, already centred per window (centre in float64 first)
  m       (B, L) float32  magnitude, centred per window over valid observations
  hidden  (B, L) bool     True where the observation is hidden from attention: padding and, during
                          pretraining, the probed observations replaced by the MASK token

The input embedding and the attention are the fused ops of the model
(``astromer_fast.kernels``); ``backend`` picks their implementation ("cuda", "triton", "cpu",
"torch", "sdpa"; ``None`` meaning the default for the device), chosen once per forward.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from torch import nn

from astromer_fast.kernels.backends import pick_backend
from astromer_fast.kernels.masked_attention import (  # noqa: F401 - attention_bias: re-exported
    MASK_RULES,
    AttentionMask,
    attention_bias,
    masked_attention,
    masked_attention_reference,
)


@dataclass
class AstromerConfig:
    """Hyper-parameters of the encoder and its regression head. Defaults are Astromer 2's."""

    name: str = "astromer2"
    n_blocks: int = 6
    d_model: int = 256
    n_heads: int = 4
    dff: int = 512
    window: int = 200
    pe_base: float = 10000.0  # the paper says 1000; the code (and so the weights) use 10000
    use_leak: bool = True  # learned Dense skip projections ("reshape_leak") in every block
    use_token: bool = True  # trainable MASK scalar replaces hidden magnitudes before projection
    # "key": -1e9 on the logits of hidden keys (v2). "query_or_key_plus1": +1 on every (query, key)
    # pair where either side is hidden (v1: what its released weights were trained with).
    mask_rule: str = "key"
    ln_eps: float = 1e-6
    dropout: float = 0.1

    def __post_init__(self):
        # Every field is checked once, here, so that a bad keyword or config.json fails with a
        # message naming the field instead of a traceback from deep inside the model or the data
        # pipeline. The upper bounds only catch values no real model has (a typo, a wrong key).
        import numbers

        def integer(name, low, high):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if not low <= value <= high:
                raise ValueError(f"{name} must be between {low} and {high}, got {value}")
            setattr(self, name, int(value))

        def real(name, ok, want):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
                    not math.isfinite(value) or not ok(value):
                raise ValueError(f"{name} must be {want}, got {value!r}")
            setattr(self, name, float(value))

        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        integer("n_blocks", 1, 1024)
        integer("d_model", 2, 1 << 16)
        integer("n_heads", 1, self.d_model)
        integer("dff", 1, 1 << 18)
        integer("window", 1, 1 << 16)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even (sin/cos channels)")
        # A rough count (the attention and feed-forward weights of every block) is enough to
        # refuse sizes that could never be allocated.
        approx_parameters = self.n_blocks * (6 * self.d_model ** 2 + 2 * self.d_model * self.dff)
        if approx_parameters > 1 << 32:
            raise ValueError(f"n_blocks={self.n_blocks}, d_model={self.d_model} and dff={self.dff} "
                             f"give about {approx_parameters:.1e} parameters, more than the "
                             f"{1 << 32:.1e} this implementation accepts")
        real("pe_base", lambda v: v > 1, "a finite number > 1")
        real("ln_eps", lambda v: v > 0, "a finite number > 0")
        real("dropout", lambda v: 0 <= v < 1, "a number in [0, 1)")
        for name in ("use_leak", "use_token"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.mask_rule not in MASK_RULES:
            raise ValueError(f"mask_rule must be one of {MASK_RULES}, got {self.mask_rule!r}")

    @classmethod
    def astromer2(cls, **overrides) -> "AstromerConfig":
        return cls(**overrides)

    @classmethod
    def astromer1(cls, **overrides) -> "AstromerConfig":
        base = dict(name="astromer1", n_blocks=2, dff=128, use_leak=False, use_token=False,
                    mask_rule="query_or_key_plus1")
        base.update(overrides)
        return cls(**base)

    @classmethod
    def preset(cls, name: str, **overrides) -> "AstromerConfig":
        presets = {"astromer2": cls.astromer2, "astromer1": cls.astromer1}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return presets[name](**overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AstromerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


class InputEmbedding(nn.Module):
    """x0 = PE(t) + m'·w + b, with m' = MASK token where hidden (SPEC section 2)."""

    def __init__(self, cfg: AstromerConfig):
        super().__init__()
        self.d_model = cfg.d_model
        self.pe_base = cfg.pe_base
        self.mag_proj = nn.Linear(1, cfg.d_model)
        # One scalar in magnitude space, zero-initialised as in the official code.
        self.mask_token = nn.Parameter(torch.zeros(1)) if cfg.use_token else None

    def forward(self, t, m, hidden, backend: str | None = None):
        from astromer_fast.kernels import input_embedding

        return input_embedding(t, m, hidden if self.mask_token is not None else None,
                               self.mag_proj.weight.view(-1), self.mag_proj.bias,
                               self.mask_token, base=self.pe_base, backend=backend)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: AstromerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.wq = nn.Linear(cfg.d_model, cfg.d_model)
        self.wk = nn.Linear(cfg.d_model, cfg.d_model)
        self.wv = nn.Linear(cfg.d_model, cfg.d_model)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model)

    def split(self, x):  # (B, L, D) -> (B, H, L, hd); head h owns channels hd*h .. hd*h+hd-1
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, mask: AttentionMask, need_weights: bool = False):
        """``mask``: the hidden keys, the rule and the implementation (``Astromer.encode`` picks
        it once). ``need_weights``: also the (B, H, L, L) weights, for plots; they come from the
        reference math whatever the implementation."""
        q, k, v = self.split(self.wq(x)), self.split(self.wk(x)), self.split(self.wv(x))
        if need_weights:
            out, weights = masked_attention_reference(q, k, v, mask.hidden, mask.rule)
        else:
            out, weights = masked_attention(q, k, v, mask.hidden, mask.rule,
                                            backend=mask.backend), None
        B, H, L, hd = out.shape
        return self.wo(out.transpose(1, 2).reshape(B, L, H * hd)), weights


class EncoderBlock(nn.Module):
    """Post-LayerNorm block; Astromer 2 adds learned 'leak' projections on both skip paths,
    Astromer 1 has no skip path at all (SPEC section 3)."""

    def __init__(self, cfg: AstromerConfig):
        super().__init__()
        d = cfg.d_model
        self.attn = MultiHeadAttention(cfg)
        self.leak1 = nn.Linear(d, d) if cfg.use_leak else None
        self.leak2 = nn.Linear(d, d) if cfg.use_leak else None
        self.ffn1 = nn.Linear(d, cfg.dff)
        self.ffn2 = nn.Linear(cfg.dff, d)
        self.ln1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.ln2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mask: AttentionMask, need_weights=False):
        a, w = self.attn(x, mask, need_weights)
        a = self.dropout(a)
        a = self.ln1(a if self.leak1 is None else self.leak1(x) + a)
        f = self.dropout(self.ffn2(torch.tanh(self.ffn1(a))))
        out = self.ln2(f if self.leak2 is None else self.leak2(a) + f)
        return out, w


class RegressionHead(nn.Module):
    """LayerNorm then Dense(256 -> 1), per observation ("RegLayer" / bn_0 + reg_layer)."""

    def __init__(self, cfg: AstromerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.proj = nn.Linear(cfg.d_model, 1)

    def forward(self, x):
        return self.proj(self.norm(x)).squeeze(-1)


class EncoderOutput(NamedTuple):
    last: torch.Tensor  # (B, L, D) output of the last block
    layers: tuple | None  # (x0, block_1, ..., block_n) when requested: n+1 tensors of (B, L, D)
    attention: tuple | None  # per block (B, H, L, L) softmax weights when requested


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid observations only (never over padding); (B, L, D) -> (B, D).
    A window with no valid observation gives zeros rather than NaN."""
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(-2) / w.sum(-2).clamp_min(1)


class Astromer(nn.Module):
    """Encoder plus the regression head of the masked-reconstruction pretraining task."""

    def __init__(self, cfg: AstromerConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or AstromerConfig()
        self.embedding = InputEmbedding(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_blocks))
        self.head = RegressionHead(cfg)

    def encode(self, t, m, hidden, *, return_layers=False, return_attention=False,
               backend: str | None = None, use_sdpa: bool = False) -> EncoderOutput:
        """``backend``: see the module docstring. ``use_sdpa=True`` is the old spelling of
        ``backend="sdpa"`` (deprecated)."""
        t, m, hidden = _check_inputs(t, m, hidden)
        if use_sdpa:
            if backend not in (None, "torch", "sdpa"):
                raise ValueError(f"use_sdpa=True (deprecated: backend='sdpa') contradicts "
                                 f"backend={backend!r}")
            warnings.warn("Astromer.encode(use_sdpa=True) is deprecated; pass backend='sdpa'",
                          DeprecationWarning, stacklevel=2)
            backend = "sdpa"
        x = self.dropout(self.embedding(t, m, hidden, backend=backend))
        # The attention implementation for this device and dtype, chosen once for every block.
        mask = AttentionMask(hidden, self.config.mask_rule,
                             pick_backend("masked_attention", x.device, x.dtype, backend))
        layers, attn = [x], []
        for block in self.blocks:
            x, w = block(x, mask, need_weights=return_attention)
            layers.append(x)
            attn.append(w)
        return EncoderOutput(x, tuple(layers) if return_layers else None,
                             tuple(attn) if return_attention else None)

    def forward(self, t, m, hidden, *, cpu_fused: str | None = None,
                fused_train: torch.dtype | None = None, **kw) -> torch.Tensor:
        """Reconstructed (centred) magnitude per observation, (B, L). ``cpu_fused="fp32"`` or
        ``"bf16"`` runs the encoder through the fused CPU passes instead (training on the CPU:
        ``astromer_fast.model.fused_cpu``). ``fused_train=dtype`` runs the fused training forward
        (``astromer_fast.model.fused_gpu_train``: fewer, larger kernels, GEMMs and attention in
        ``dtype``, e.g. ``torch.bfloat16`` on CUDA without autocast); it takes ``backend`` (the
        input embedding's) from the keywords. Other keywords go to ``encode``."""
        if cpu_fused is not None and fused_train is not None:
            raise ValueError("cpu_fused and fused_train are two encoders: ask for one")
        if fused_train is not None:
            from astromer_fast.model.fused_gpu_train import fused_train_forward

            unknown = sorted(set(kw) - {"backend"})
            if unknown:
                raise TypeError(f"fused_train takes no keywords {unknown} (only backend)")
            return fused_train_forward(self, t, m, hidden, dtype=fused_train,
                                       backend=kw.get("backend"))
        if cpu_fused is not None:
            from astromer_fast.model.fused_cpu import fused_cpu_encode

            return self.head(fused_cpu_encode(self, t, m, hidden, cpu_fused))
        return self.head(self.encode(t, m, hidden, **kw).last)

    @torch.no_grad()
    def embed_windows(self, t, m, valid, *, layers: bool = False, **kw) -> torch.Tensor:
        """Per-window embedding: mean of the last block over valid observations, (B, D).
        With ``layers=True``: the 7 (n_blocks + 1) per-layer means, (B, n_blocks + 1, D), the input
        of the paper's gamma-weighted classifier embedding."""
        out = self.encode(t, m, ~valid, return_layers=layers, **kw)
        if not layers:
            return masked_mean(out.last, valid)
        return torch.stack([masked_mean(x, valid) for x in out.layers], dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # Persistence lives in astromer_fast.weights; these are the methods users expect to find here.
    def save_pretrained(self, directory, **kw):
        from astromer_fast.weights.pretrained import save_pretrained

        return save_pretrained(self, directory, **kw)

    @classmethod
    def from_pretrained(cls, directory, **kw) -> "Astromer":
        from astromer_fast.weights.pretrained import from_pretrained

        return from_pretrained(directory, **kw)


def _check_inputs(t, m, hidden):
    if t.dim() != 2 or t.shape != m.shape or t.shape != hidden.shape:
        raise ValueError(f"t, m, hidden must all be (B, L); got {tuple(t.shape)}, "
                         f"{tuple(m.shape)}, {tuple(hidden.shape)}")
    if hidden.dtype != torch.bool:
        raise TypeError(f"hidden must be a bool tensor, got {hidden.dtype}")
    if not (t.is_floating_point() and m.is_floating_point()):
        raise TypeError(f"t and m must be floating point, got {t.dtype}, {m.dtype}")
    return t, m, hidden
