"""The encoder on the CPU as one fused pass per block, for inference: what ``embed`` runs there.

The plain model (``astromer.py``) spends most of its CPU time outside its GEMMs: bias copies,
dtype casts under autocast, separate tanh, add and LayerNorm passes, head transposes. Here the
weights are prepared once per precision, and each block is four GEMMs (torch's, i.e. oneDNN) with
everything else fused into three C++ passes (``csrc/cpu/fused_block.h``)::

    Y = X [Wq; Wk; Wv; Wleak1]^T            one GEMM for the three projections and the first skip
    O = attention(Y)                         q, k, v read out of Y by strides, biases added there
    A = LN1(O Wo^T + bo + Y_leak + bleak1)
    U = A [Wffn1; Wleak2]^T;  H = tanh(U_ffn + bffn1)   (in place)
    X = LN2(H Wffn2^T + bffn2 + U_leak + bleak2)        (+ the window means of the last block)

Precisions: ``fp32`` (float32 throughout) and ``bf16`` (bfloat16 activations and weights, float32
accumulation, LayerNorm, softmax and pooling in float32). The default on a CPU is ``bf16`` where the
CPU has native bfloat16 arithmetic (AVX-512 BF16 or AMX), else ``fp32``; ``precision=`` or
``$ASTROMER_FAST_PRECISION`` chooses. ``bench/RESULTS.md`` gives each mode's speed and its cosine
to float32 on real curves.

Only the window means come out (the embedding, or every layer's for the paper's classifier): rows
of padding are never computed as queries, which is exact because no visible row reads them.
"""

from __future__ import annotations

import math
import os

import torch

from astromer_fast.kernels import _ext

PRECISIONS = ("fp32", "bf16")
PRECISION_ENV = "ASTROMER_FAST_PRECISION"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_RULE_ID = {"key": 0, "query_or_key_plus1": 1}


def cpu_isa_info() -> dict:
    """The CPU model, its vector features and the level the fused kernels run at
    (``astromer_fast._C``), or {} without the extension."""
    ext = _ext.cpu_ext()
    return dict(ext.cpu_isa_info()) if ext is not None else {}


def native_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (AVX-512 BF16 or AMX-BF16)."""
    feats = cpu_isa_info().get("features", [])
    return "avx512_bf16" in feats or "amx_bf16" in feats


def resolve_precision(precision: str | None = None) -> str:
    """``precision`` (else ``$ASTROMER_FAST_PRECISION``), or the default for this CPU: the fastest
    mode whose accuracy passes, i.e. ``bf16`` with native bfloat16 arithmetic, else ``fp32``."""
    if precision is None:
        precision = os.environ.get(PRECISION_ENV, "").strip() or None
        source = f" (from ${PRECISION_ENV})"
    else:
        source = ""
    if precision in (None, "auto"):
        return "bf16" if native_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or 'auto', got {precision!r}{source}")
    return precision


def fused_cpu_unsupported(config) -> str | None:
    """Why the fused CPU encoder cannot run this configuration, or None if it can."""
    if _ext.cpu_ext() is None:
        return f"the C++ extension is not available ({_ext.cpu_ext_error()})"
    hd = config.d_model // config.n_heads
    if config.d_model % 16 or config.dff % 16:
        return f"d_model ({config.d_model}) and dff ({config.dff}) must be multiples of 16"
    if hd % 16 or hd > 256:
        return f"the head size ({hd}) must be a multiple of 16, at most 256"
    return None


class _Block:
    """One encoder block's weights as the fused pass reads them."""

    def __init__(self, blk, dtype):
        f32 = torch.float32
        a = blk.attn
        leak = blk.leak1 is not None
        w_in = [a.wq.weight, a.wk.weight, a.wv.weight] + ([blk.leak1.weight] if leak else [])
        # GEMMs take the weights transposed and contiguous: (in, out).
        self.w_in = torch.cat(w_in, 0).t().contiguous().to(dtype)
        self.b_qkv = torch.cat([a.wq.bias, a.wk.bias, a.wv.bias]).to(f32).contiguous()
        self.b_leak1 = blk.leak1.bias.to(f32).contiguous() if leak else None
        self.w_o = a.wo.weight.t().contiguous().to(dtype)
        self.b_o = a.wo.bias.to(f32).contiguous()
        w_f1 = [blk.ffn1.weight] + ([blk.leak2.weight] if leak else [])
        self.w_f1 = torch.cat(w_f1, 0).t().contiguous().to(dtype)
        self.b_f1 = blk.ffn1.bias.to(f32).contiguous()
        self.b_leak2 = blk.leak2.bias.to(f32).contiguous() if leak else None
        self.w_f2 = blk.ffn2.weight.t().contiguous().to(dtype)
        self.b_f2 = blk.ffn2.bias.to(f32).contiguous()
        self.ln1 = (blk.ln1.weight.to(f32).contiguous(), blk.ln1.bias.to(f32).contiguous())
        self.ln2 = (blk.ln2.weight.to(f32).contiguous(), blk.ln2.bias.to(f32).contiguous())


class FusedCpuEncoder:
    """Window embeddings of an ``Astromer`` on the CPU through the fused blocks.

    ``encoder(t, m, valid)`` -> (B, D) float32 window means of the last block over the valid
    observations; ``layers=True`` -> (B, n_blocks + 1, D), the input embedding's and every
    block's. Same inputs as ``Astromer.embed_windows`` (float32 (B, L) centred t and m, bool valid).
    The weights are copied at construction: build a new encoder after changing the model's.
    """

    def __init__(self, model, precision: str | None = None):
        cfg = model.config
        why = fused_cpu_unsupported(cfg)
        if why is not None:
            raise ValueError(f"the fused CPU encoder cannot run this model: {why}")
        self.config = cfg
        self.precision = resolve_precision(precision)
        self.dtype = _DTYPES[self.precision]
        self.ext = _ext.require_cpu_ext()
        with torch.no_grad():
            emb = model.embedding
            self.mag_w = emb.mag_proj.weight.detach().reshape(-1).float().contiguous()
            self.mag_b = emb.mag_proj.bias.detach().float().contiguous()
            self.token = (emb.mask_token.detach().float().contiguous()
                          if emb.mask_token is not None else None)
            self.blocks = [_Block(b, self.dtype) for b in model.blocks]
        self.leak = cfg.use_leak
        self._ws: dict[str, torch.Tensor] = {}
        self._ws_rows = 0

    def _workspace(self, rows: int) -> dict:
        """Activation buffers for ``rows`` rows, reused across calls (fresh pages cost faults)."""
        if rows > self._ws_rows:
            d, dff, dt = self.config.d_model, self.config.dff, self.dtype
            n_in = 4 * d if self.leak else 3 * d
            n_f1 = dff + d if self.leak else dff
            cap = max(rows, self._ws_rows * 5 // 4)
            self._ws = {"x": torch.empty(cap, d, dtype=dt), "y": torch.empty(cap, n_in, dtype=dt),
                        "o": torch.empty(cap, d, dtype=dt), "z": torch.empty(cap, d, dtype=dt),
                        "a": torch.empty(cap, d, dtype=dt), "u": torch.empty(cap, n_f1, dtype=dt)}
            self._ws_rows = cap
        return {k: v[:rows] for k, v in self._ws.items()}

    @torch.no_grad()
    def __call__(self, t: torch.Tensor, m: torch.Tensor, valid: torch.Tensor,
                 layers: bool = False) -> torch.Tensor:
        if t.dim() != 2 or t.shape != m.shape or t.shape != valid.shape:
            raise ValueError(f"t, m, valid must all be (B, L); got {tuple(t.shape)}, "
                             f"{tuple(m.shape)}, {tuple(valid.shape)}")
        if valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
        if t.device.type != "cpu":
            raise ValueError(f"the fused CPU encoder takes CPU tensors, got {t.device}")
        cfg, ext, bf16 = self.config, self.ext, self.dtype == torch.bfloat16
        B, L = t.shape
        N, D, dff, H = B * L, cfg.d_model, cfg.dff, cfg.n_heads
        n_out = cfg.n_blocks + 1 if layers else 1
        pooled = torch.zeros(B, n_out, D, dtype=torch.float32)
        if N == 0:
            return pooled if layers else pooled[:, 0]
        nt = max(1, torch.get_num_threads())
        t = t.contiguous().float()
        m = m.contiguous().float()
        valid = valid.contiguous()
        hidden = (~valid).contiguous()
        ws = self._workspace(N)
        x, y, o, z, a, u = (ws[k] for k in ("x", "y", "o", "z", "a", "u"))
        ptr, es = _ext.ptr, x.element_size()
        ext.input_embedding_forward(
            t.data_ptr(), m.data_ptr(), ptr(hidden) if self.token is not None else 0,
            self.mag_w.data_ptr(), self.mag_b.data_ptr(), ptr(self.token), float(cfg.pe_base),
            N, D, 0 if bf16 else x.data_ptr(), nt, out_bf16=x.data_ptr() if bf16 else 0)
        if layers:
            w = valid.to(torch.float32).unsqueeze(-1)
            pooled[:, 0] = (x.view(B, L, D).float() * w).sum(1) / w.sum(1).clamp_min(1)
        rule = _RULE_ID[cfg.mask_rule]
        scale = 1.0 / math.sqrt(D // H)
        for i, blk in enumerate(self.blocks):
            torch.mm(x, blk.w_in, out=y)
            ext.block_attention(y.data_ptr(), y.stride(0), blk.b_qkv.data_ptr(), hidden.data_ptr(),
                                B, L, H, D // H, rule, scale, rule == 0, bf16, o.data_ptr(), D, nt)
            torch.mm(o, blk.w_o, out=z)
            res1 = y.data_ptr() + 3 * D * es if self.leak else 0
            ext.residual_layernorm(z.data_ptr(), D, blk.b_o.data_ptr(), res1, y.stride(0),
                                   ptr(blk.b_leak1), blk.ln1[0].data_ptr(), blk.ln1[1].data_ptr(),
                                   cfg.ln_eps, N, D, bf16, a.data_ptr(), D, num_threads=nt)
            torch.mm(a, blk.w_f1, out=u)
            ext.bias_tanh(u.data_ptr(), u.stride(0), blk.b_f1.data_ptr(), N, dff, bf16,
                          u.data_ptr(), u.stride(0), nt)
            torch.mm(u[:, :dff], blk.w_f2, out=z)
            res2 = u.data_ptr() + dff * es if self.leak else 0
            pool = layers or i == len(self.blocks) - 1
            slot = i + 1 if layers else 0
            ext.residual_layernorm(z.data_ptr(), D, blk.b_f2.data_ptr(), res2, u.stride(0),
                                   ptr(blk.b_leak2), blk.ln2[0].data_ptr(), blk.ln2[1].data_ptr(),
                                   cfg.ln_eps, N, D, bf16, x.data_ptr(), D,
                                   valid.data_ptr() if pool else 0, L if pool else 0,
                                   pooled.data_ptr() + slot * D * 4 if pool else 0,
                                   n_out * D, nt)
        return pooled if layers else pooled[:, 0]
