"""The encoder on the CPU as fused passes per block: what ``embed`` and CPU training run there.

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
to float32 on real curves. Training (``fused_cpu_encode``) runs the same passes with dropout, and
their backward passes, inside one autograd Function per block.

Only the window means come out (the embedding, or every layer's for the paper's classifier). Under
Astromer 2's mask rule a hidden key gets exactly zero weight, so the windows are packed: only
their valid observations are stored, projected and attended to, wherever padding sits. (Astromer 1's
rule gives hidden keys weight, so its windows keep their padding rows.)
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


def check_window_inputs(t: torch.Tensor, m: torch.Tensor, valid: torch.Tensor) -> None:
    """What every fused encoder takes: ``t``, ``m`` and a bool ``valid``, all (B, L)."""
    if t.dim() != 2 or t.shape != m.shape or t.shape != valid.shape:
        raise ValueError(f"t, m, valid must all be (B, L); got {tuple(t.shape)}, "
                         f"{tuple(m.shape)}, {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")


def precision_asked(precision: str | None = None) -> bool:
    """Whether a precision was chosen (by argument or ``$ASTROMER_FAST_PRECISION``) rather than
    left to the machine's default."""
    if precision is None:
        precision = os.environ.get(PRECISION_ENV, "").strip() or None
    return precision not in (None, "auto")


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
        raise ValueError(f"precision must be one of {PRECISIONS} or 'auto', got "
                         f"{precision!r}{source}")
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
        check_window_inputs(t, m, valid)
        if t.device.type != "cpu":
            raise ValueError(f"the fused CPU encoder takes CPU tensors, got {t.device}")
        cfg, ext, bf16 = self.config, self.ext, self.dtype == torch.bfloat16
        B, L = t.shape
        D, dff, H = cfg.d_model, cfg.dff, cfg.n_heads
        n_out = cfg.n_blocks + 1 if layers else 1
        pooled = torch.zeros(B, n_out, D, dtype=torch.float32)
        if B * L == 0:
            return pooled if layers else pooled[:, 0]
        nt = max(1, torch.get_num_threads())
        rule = _RULE_ID[cfg.mask_rule]
        packed = rule == 0
        valid = valid.contiguous()
        if packed:  # valid observations only, window after window
            counts = valid.sum(1)
            offsets = torch.zeros(B + 1, dtype=torch.int64)
            torch.cumsum(counts, 0, out=offsets[1:])
            t = t.float()[valid].contiguous()
            m = m.float()[valid].contiguous()
            N, L = int(offsets[-1]), max(int(counts.max()), 1)
            hidden = None
            if N == 0:  # nothing valid anywhere: every window's mean is zero
                return pooled if layers else pooled[:, 0]
        else:
            t = t.contiguous().float()
            m = m.contiguous().float()
            N = B * L
            hidden = (~valid).contiguous()
        ws = self._workspace(N)
        x, y, o, z, a, u = (ws[k] for k in ("x", "y", "o", "z", "a", "u"))
        ptr, es = _ext.ptr, x.element_size()
        ext.input_embedding_forward(
            t.data_ptr(), m.data_ptr(), ptr(hidden) if self.token is not None else 0,
            self.mag_w.data_ptr(), self.mag_b.data_ptr(), ptr(self.token), float(cfg.pe_base), N,
            D, 0 if bf16 else x.data_ptr(), nt, out_bf16=x.data_ptr() if bf16 else 0)
        if layers:
            if packed:
                win = torch.repeat_interleave(torch.arange(B), counts)
                sums = torch.zeros(B, D).index_add_(0, win, x[:N].float())
                pooled[:, 0] = sums / counts.clamp_min(1).unsqueeze(-1)
            else:
                w = valid.to(torch.float32).unsqueeze(-1)
                pooled[:, 0] = (x.view(B, L, D).float() * w).sum(1) / w.sum(1).clamp_min(1)
        # Pooling: packed windows by their row offsets, padded ones by their valid flags.
        pool_kw = (dict(row_offsets=offsets.data_ptr(), windows=B) if packed
                   else dict(valid=valid.data_ptr(), window_rows=L))
        scale = 1.0 / math.sqrt(D // H)
        for i, blk in enumerate(self.blocks):
            torch.mm(x, blk.w_in, out=y)
            ext.block_attention(y.data_ptr(), y.stride(0), blk.b_qkv.data_ptr(), ptr(hidden),
                                B, L, H, D // H, rule, scale, rule == 0, bf16, o.data_ptr(), D, nt,
                                row_offsets=offsets.data_ptr() if packed else 0)
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
                                   pooled=pooled.data_ptr() + slot * D * 4 if pool else 0,
                                   ld_pooled=n_out * D, num_threads=nt,
                                   **(pool_kw if pool else {}))
        return pooled if layers else pooled[:, 0]


# -------------------------------------------------------------------------------------------------
# Training: the same fused passes with dropout, each with its backward
# -------------------------------------------------------------------------------------------------
def _block_params(blk) -> list:
    """The block's parameters in the order _FusedBlock takes them (None where Astromer 1 has no
    skip projection)."""
    a = blk.attn
    leak1 = (blk.leak1.weight, blk.leak1.bias) if blk.leak1 is not None else (None, None)
    leak2 = (blk.leak2.weight, blk.leak2.bias) if blk.leak2 is not None else (None, None)
    return [a.wq.weight, a.wq.bias, a.wk.weight, a.wk.bias, a.wv.weight, a.wv.bias, *leak1,
            a.wo.weight, a.wo.bias, blk.ffn1.weight, blk.ffn1.bias, *leak2, blk.ffn2.weight,
            blk.ffn2.bias, blk.ln1.weight, blk.ln1.bias, blk.ln2.weight, blk.ln2.bias]


class _FusedBlock(torch.autograd.Function):
    """One encoder block on (B*L, D) activations of dtype ``dtype``; gradients for every parameter
    (float32, like the parameters) and for the input. See the module docstring for the passes."""

    @staticmethod
    def forward(ctx, x, hidden, shape, cfg, dtype, keep, seeds, *params):
        (wq, bq, wk, bk, wv, bv, wl1, bl1, wo, bo, w1, b1, wl2, bl2, w2, b2,
         g1, be1, g2, be2) = params
        ext, bf16, ptr = _ext.require_cpu_ext(), dtype == torch.bfloat16, _ext.ptr
        B, L = shape
        N, D, dff, H = B * L, cfg.d_model, cfg.dff, cfg.n_heads
        leak = wl1 is not None
        nt = max(1, torch.get_num_threads())
        es = x.element_size()
        f32 = torch.float32
        w_in = torch.cat([wq, wk, wv] + ([wl1] if leak else [])).to(dtype)
        b_qkv = torch.cat([bq, bk, bv]).to(f32)
        y = torch.mm(x, w_in.t())
        o = torch.empty(N, D, dtype=dtype)
        lse = torch.empty(B, H, L, dtype=f32)
        rule = _RULE_ID[cfg.mask_rule]
        scale = 1.0 / math.sqrt(D // H)
        ext.block_attention(y.data_ptr(), y.stride(0), b_qkv.data_ptr(), hidden.data_ptr(), B, L,
                            H, D // H, rule, scale, False, bf16, o.data_ptr(), D, nt,
                            lse=lse.data_ptr())
        w_o = wo.to(dtype)
        z = torch.mm(o, w_o.t())
        a = torch.empty(N, D, dtype=dtype)
        xhat1, xhat2 = torch.empty(N, D, dtype=f32), torch.empty(N, D, dtype=f32)
        rstd1, rstd2 = torch.empty(N, dtype=f32), torch.empty(N, dtype=f32)
        f32c = [t.to(f32).contiguous() if t is not None else None
                for t in (bo, bl1, g1, be1, b1, b2, bl2, g2, be2)]
        bo_, bl1_, g1_, be1_, b1_, b2_, bl2_, g2_, be2_ = f32c
        ext.residual_layernorm(z.data_ptr(), D, bo_.data_ptr(),
                               y.data_ptr() + 3 * D * es if leak else 0, y.stride(0), ptr(bl1_),
                               g1_.data_ptr(), be1_.data_ptr(), cfg.ln_eps, N, D, bf16,
                               a.data_ptr(), D, num_threads=nt, dropout_keep=keep,
                               dropout_seed=seeds[0], xhat=xhat1.data_ptr(),
                               rstd=rstd1.data_ptr())
        w_1 = torch.cat([w1] + ([wl2] if leak else [])).to(dtype)
        u = torch.mm(a, w_1.t())
        ext.bias_tanh(u.data_ptr(), u.stride(0), b1_.data_ptr(), N, dff, bf16, u.data_ptr(),
                      u.stride(0), nt)
        w_2 = w2.to(dtype)
        f = torch.mm(u[:, :dff], w_2.t())
        out = torch.empty(N, D, dtype=dtype)
        ext.residual_layernorm(f.data_ptr(), D, b2_.data_ptr(),
                               u.data_ptr() + dff * es if leak else 0, u.stride(0), ptr(bl2_),
                               g2_.data_ptr(), be2_.data_ptr(), cfg.ln_eps, N, D, bf16,
                               out.data_ptr(), D, num_threads=nt, dropout_keep=keep,
                               dropout_seed=seeds[1], xhat=xhat2.data_ptr(),
                               rstd=rstd2.data_ptr())
        ctx.save_for_backward(x, hidden, w_in, b_qkv, y, o, lse, w_o, a, w_1, u, w_2, xhat1,
                              rstd1, xhat2, rstd2, g1_, g2_)
        ctx.meta = (shape, cfg, dtype, keep, seeds, leak)
        return out

    @staticmethod
    def backward(ctx, d_out):
        (x, hidden, w_in, b_qkv, y, o, lse, w_o, a, w_1, u, w_2, xhat1, rstd1, xhat2, rstd2,
         g1, g2) = ctx.saved_tensors
        (B, L), cfg, dtype, keep, seeds, leak = ctx.meta
        ext, bf16 = _ext.require_cpu_ext(), dtype == torch.bfloat16
        N, D, dff, H = B * L, cfg.d_model, cfg.dff, cfg.n_heads
        nt = max(1, torch.get_num_threads())
        f32 = torch.float32
        d_out = d_out.to(dtype).contiguous()
        blocks = -(-N // 64)
        es = d_out.element_size()
        # LN2: d_f (dropout applied) and the skip path's gradient into d_u's last columns.
        d_f = torch.empty(N, D, dtype=dtype)
        d_u = torch.empty(N, u.shape[1], dtype=dtype)
        part2 = torch.empty(blocks, 4, D, dtype=f32)
        ext.residual_layernorm_backward(d_out.data_ptr(), D, xhat2.data_ptr(), rstd2.data_ptr(),
                                        g2.data_ptr(), N, D, bf16, keep, seeds[1],
                                        d_f.data_ptr(), D,
                                        d_u.data_ptr() + dff * es if leak else 0, d_u.stride(0),
                                        part2.data_ptr(), nt)
        dg2, dbe2, db2, dbl2 = part2.sum(0)
        h = u[:, :dff]
        d_h = torch.mm(d_f, w_2)
        dw2 = torch.mm(d_f.t(), h)
        part_t = torch.empty(blocks, dff, dtype=f32)
        ext.tanh_backward(d_h.data_ptr(), dff, u.data_ptr(), u.stride(0), N, dff, bf16,
                          d_u.data_ptr(), d_u.stride(0), part_t.data_ptr(), nt)
        db1 = part_t.sum(0)
        d_a = torch.mm(d_u, w_1)
        dw_1 = torch.mm(d_u.t(), a)
        # LN1: d_z (dropout applied) and the first skip path's gradient into d_y's last columns.
        d_z = torch.empty(N, D, dtype=dtype)
        d_y = torch.empty(N, y.shape[1], dtype=dtype)
        part1 = torch.empty(blocks, 4, D, dtype=f32)
        ext.residual_layernorm_backward(d_a.data_ptr(), D, xhat1.data_ptr(), rstd1.data_ptr(),
                                        g1.data_ptr(), N, D, bf16, keep, seeds[0],
                                        d_z.data_ptr(), D,
                                        d_y.data_ptr() + 3 * D * es if leak else 0,
                                        d_y.stride(0), part1.data_ptr(), nt)
        dg1, dbe1, dbo, dbl1 = part1.sum(0)
        d_o = torch.mm(d_z, w_o)
        dwo = torch.mm(d_z.t(), o)
        bias_part = torch.empty(B, 3 * D, dtype=f32)
        ext.block_attention_backward(y.data_ptr(), y.stride(0), b_qkv.data_ptr(),
                                     hidden.data_ptr(), B, L, H, D // H,
                                     _RULE_ID[cfg.mask_rule], 1.0 / math.sqrt(D // H), bf16,
                                     o.data_ptr(), D, lse.data_ptr(), d_o.data_ptr(), D,
                                     d_y.data_ptr(), d_y.stride(0), bias_part.data_ptr(), nt)
        db_qkv = bias_part.sum(0)
        d_x = torch.mm(d_y, w_in)
        dw_in = torch.mm(d_y.t(), x).to(f32)
        dw_1 = dw_1.to(f32)
        dwq, dwk, dwv = dw_in[:D], dw_in[D:2 * D], dw_in[2 * D:3 * D]
        dbq, dbk, dbv = db_qkv[:D], db_qkv[D:2 * D], db_qkv[2 * D:]
        grads = [dwq, dbq, dwk, dbk, dwv, dbv,
                 dw_in[3 * D:] if leak else None, dbl1 if leak else None,
                 dwo.to(f32), dbo, dw_1[:dff], db1,
                 dw_1[dff:] if leak else None, dbl2 if leak else None,
                 dw2.to(f32), db2, dg1, dbe1, dg2, dbe2]
        return (d_x, None, None, None, None, None, None, *grads)


def fused_cpu_encode(model, t, m, hidden, precision: str | None = None) -> torch.Tensor:
    """The last block's output (B, L, D), float32, through the fused passes, differentiable in
    every parameter of ``model.embedding`` and ``model.blocks``; dropout (``model.training``) as
    the plain model's, from torch's random generator. For training on the CPU."""
    from astromer_fast.model.astromer import _check_inputs

    cfg = model.config
    why = fused_cpu_unsupported(cfg)
    if why is not None:
        raise ValueError(f"the fused CPU encoder cannot run this model: {why}")
    t, m, hidden = _check_inputs(t, m, hidden)
    dtype = _DTYPES[resolve_precision(precision)]
    B, L = t.shape
    x = model.dropout(model.embedding(t, m, hidden)).to(dtype).reshape(B * L, cfg.d_model)
    keep = 1.0 - cfg.dropout if model.training else 1.0
    hidden_c = hidden.contiguous()
    for blk in model.blocks:
        seeds = torch.randint(0, 2**62, (2,)).tolist() if keep < 1.0 else [0, 0]
        x = _FusedBlock.apply(x, hidden_c, (B, L), cfg, dtype, keep, seeds, *_block_params(blk))
    return x.view(B, L, cfg.d_model).float()
