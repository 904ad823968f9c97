"""The encoder on a GPU as fused passes per block: the CUDA counterpart of ``fused_cpu``.

The plain model under bf16 autocast spends its GPU time in many small launches and copies: a cast
of every weight at every call, three projections, head transposes before and after the attention,
separate bias, add, tanh and LayerNorm passes. Here the weights are cast and concatenated once,
and each block is four GEMMs (cuBLAS) around three fused Triton passes::

    Y = X [Wq; Wk; Wv; Wleak1]^T + [bq; bk; bv; bleak1]     one GEMM, biases in its epilogue
    O = attention(Y)                                          q, k, v read out of Y
    A = LN1(O Wo^T + bo + Y_leak)                             one pass (``residual_layernorm``)
    U = A [Wffn1; Wleak2]^T;  U_ffn = tanh(U_ffn + bffn1)     one pass, in place (``bias_tanh``)
    X = LN2(U_ffn Wffn2^T + bffn2 + U_leak + bleak2)          one pass, plus the window means

The attention is selectable (``ATTENTIONS``): ``sdpa`` (torch's SDPA with the rule's additive
bias, on strided views of Y), ``triton`` (the flash-style kernel of
``kernels/_triton_fused_block.py``, no transposes, fully hidden key blocks skipped), ``cuda_tc``
(the bf16 tensor-core CUDA kernel of ``csrc/cuda/masked_attention_tc.cu``) and ``torch`` (the
reference math, for tests). ``elementwise="torch"`` runs the three fused passes as plain PyTorch,
which is how the class runs on CPU tensors without ``TRITON_INTERPRET=1``.

``gemm="triton"`` folds the three passes into the GEMMs before them
(``kernels/_triton_fused_gemm.py``): the output projection and the second feed-forward layer end
in the residual + LayerNorm, the first feed-forward layer in bias + tanh, and the window means are
a separate small pass. ``gemm="triton_mlp"`` also fuses the two feed-forward layers into one
kernel, so the hidden layer U never reaches memory. ``gemm="triton_block"`` (with
``attention="triton"``) also runs the attention, the output projection and LN1 as one kernel, so
a block is three launches: the QKV GEMM, the attention half, the feed-forward half. Only the
fused QKV projection stays with cuBLAS (its bias is cuBLAS's own epilogue). Which GEMMs are fastest is for the calibration to
measure.

Activations are bf16 on CUDA (float32 accumulation, LayerNorm statistics, softmax and pooling in
float32), like the plain model under autocast; ``dtype=torch.float32`` is for the interpreter
tests. Rows stay padded (B * L, one window after another): ``embed`` already trims each batch
to its longest window, and fixed shapes are what CUDA graphs per width bucket need.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from astromer_fast.kernels.masked_attention import attention_bias, masked_attention_reference

ATTENTIONS = ("sdpa", "triton", "cuda_tc", "torch")
ELEMENTWISE = ("triton", "torch")
GEMMS = ("cublas", "triton", "triton_mlp", "triton_block")
GPU_PATHS = ("fused", "plain")
GPU_PATH_ENV = "ASTROMER_FAST_GPU_PATH"
ATTENTION_ENV = "ASTROMER_FAST_GPU_ATTENTION"
GEMM_ENV = "ASTROMER_FAST_GPU_GEMM"
_RULE_ID = {"key": 0, "query_or_key_plus1": 1}


def fused_gpu_unsupported(config) -> str | None:
    """Why the fused GPU encoder cannot run this configuration, or None if it can."""
    hd = config.d_model // config.n_heads
    if hd % 16 or hd > 256 or hd & (hd - 1):
        return f"the head size ({hd}) must be a power of two from 16 to 256"
    if config.d_model % 16 or config.dff % 16:
        return f"d_model ({config.d_model}) and dff ({config.dff}) must be multiples of 16"
    return None


def attention_unavailable(name: str, device: torch.device, dtype: torch.dtype, hd: int,
                          L: int | None = None) -> str | None:
    """Why attention ``name`` cannot run here, or None."""
    from astromer_fast.kernels import _ext
    from astromer_fast.kernels.backends import unavailable_reason

    if name not in ATTENTIONS:
        return f"unknown attention {name!r}; choose one of {ATTENTIONS}"
    if name == "triton":
        return unavailable_reason("triton", device)
    if name == "cuda_tc":
        if device.type != "cuda":
            return "the tensor-core CUDA kernel needs CUDA tensors"
        if _ext.cuda_ext() is None:
            return f"the CUDA extension is not available ({_ext.cuda_ext_error()})"
        if dtype != torch.bfloat16 or hd != 64:
            return "the tensor-core CUDA kernel takes bf16 with head size 64"
        if L is not None and L > 256:
            return f"the tensor-core CUDA kernel takes windows up to 256, got {L}"
    return None


class _Block:
    """One encoder block's weights, cast and concatenated once, as the fused passes read them."""

    def __init__(self, blk, dtype, device):
        # Biases and LayerNorm parameters in float32 (float64 for the oracle's float64 runs).
        f32 = torch.float64 if dtype == torch.float64 else torch.float32
        a = blk.attn
        leak = blk.leak1 is not None

        def cast(x, dt=dtype):
            return x.detach().to(device=device, dtype=dt).contiguous()

        w_in = [a.wq.weight, a.wk.weight, a.wv.weight] + ([blk.leak1.weight] if leak else [])
        b_in = [a.wq.bias, a.wk.bias, a.wv.bias] + ([blk.leak1.bias] if leak else [])
        # GEMMs take the weights transposed, (in, out): X @ W.
        self.w_in = cast(torch.cat(w_in, 0).t())
        self.b_in = cast(torch.cat(b_in))
        self.w_o = cast(a.wo.weight.t())
        self.b_o = cast(a.wo.bias, f32)
        w_f1 = [blk.ffn1.weight] + ([blk.leak2.weight] if leak else [])
        self.w_f1 = cast(torch.cat(w_f1, 0).t())
        self.b_f1 = cast(blk.ffn1.bias, f32)
        self.b_leak2 = cast(blk.leak2.bias, f32) if leak else None
        self.w_f2 = cast(blk.ffn2.weight.t())
        self.b_f2 = cast(blk.ffn2.bias, f32)
        self.ln1 = (cast(blk.ln1.weight, f32), cast(blk.ln1.bias, f32))
        self.ln2 = (cast(blk.ln2.weight, f32), cast(blk.ln2.bias, f32))


def default_attention(device: torch.device) -> str:
    """``$ASTROMER_FAST_GPU_ATTENTION``, else the calibrated choice for this GPU, else ``sdpa``."""
    env = os.environ.get(ATTENTION_ENV, "").strip()
    if env:
        if env not in ATTENTIONS:
            raise ValueError(f"${ATTENTION_ENV}={env!r}: choose one of {ATTENTIONS}")
        return env
    if device.type == "cuda":
        from astromer_fast.kernels.calibration import cached_choice

        choice = cached_choice(device)
        if choice and choice.get("attention") in ATTENTIONS:
            return choice["attention"]
        return "sdpa"
    return "torch"


class FusedGpuEncoder:
    """Window embeddings of an ``Astromer`` through the fused GPU blocks (inference only).

    ``encoder(t, m, valid)`` -> (B, D) float32 window means of the last block over the valid
    observations; ``layers=True`` -> (B, n_blocks + 1, D). Same inputs as
    ``Astromer.embed_windows``. The weights are copied at construction (on the model's device):
    build a new encoder after changing the model's.
    """

    def __init__(self, model, *, attention: str | None = None, elementwise: str | None = None,
                 dtype: torch.dtype | None = None, stages: int | None = None,
                 gemm: str | None = None):
        cfg = model.config
        why = fused_gpu_unsupported(cfg)
        if why is not None:
            raise ValueError(f"the fused GPU encoder cannot run this model: {why}")
        self.config = cfg
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
        if self.dtype not in (torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"dtype must be bfloat16, float32 or float64, got {self.dtype}")
        self.attention = attention or default_attention(self.device)
        hd = cfg.d_model // cfg.n_heads
        why = attention_unavailable(self.attention, self.device, self.dtype, hd)
        if why is not None:
            raise ValueError(f"attention {self.attention!r} cannot run: {why}")
        self.elementwise = elementwise or ("triton" if cuda else "torch")
        if self.elementwise not in ELEMENTWISE:
            raise ValueError(f"elementwise must be one of {ELEMENTWISE}, got {self.elementwise!r}")
        self.gemm = gemm or os.environ.get(GEMM_ENV, "").strip() or "cublas"
        if self.gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {GEMMS}, got {self.gemm!r} "
                             f"(argument or ${GEMM_ENV})")
        if self.gemm == "triton_block" and self.attention != "triton":
            raise ValueError(f"gemm='triton_block' runs its own Triton attention: it takes "
                             f"attention='triton', not {self.attention!r}")
        if "triton" in (self.elementwise, self.attention) or self.gemm != "cublas":
            from astromer_fast.kernels.backends import unavailable_reason

            if self.dtype == torch.float64:
                raise ValueError("the Triton passes take bfloat16 or float32, not float64")
            why = unavailable_reason("triton", self.device)
            if why is not None:
                raise ValueError(f"the fused GPU encoder's Triton passes cannot run: {why}")
        self.stages = stages
        with torch.no_grad():
            emb = model.embedding
            ft = torch.float64 if self.dtype == torch.float64 else torch.float32
            self.mag_w = emb.mag_proj.weight.detach().reshape(-1).to(ft).contiguous()
            self.mag_b = emb.mag_proj.bias.detach().to(ft).contiguous()
            self.token = (emb.mask_token.detach().to(ft).contiguous()
                          if emb.mask_token is not None else None)
            self.blocks = [_Block(b, self.dtype, self.device) for b in model.blocks]
        self.leak = cfg.use_leak

    # -- the three fused passes, Triton or PyTorch ------------------------------------------------
    def _bias_tanh(self, u, bias, n):
        if self.elementwise == "triton":
            from astromer_fast.kernels import _triton_fused_block as tfb

            tfb.bias_tanh(u, bias, n)
        else:
            acc = torch.float64 if u.dtype == torch.float64 else torch.float32
            u[:, :n] = torch.tanh(u[:, :n].to(acc) + bias).to(u.dtype)

    def _residual_ln(self, z, bias, res, res_bias, ln, out, B, L, valid, pooled):
        if self.elementwise == "triton":
            from astromer_fast.kernels import _triton_fused_block as tfb

            tfb.residual_layernorm(z, bias, res, res_bias, ln[0], ln[1], self.config.ln_eps,
                                   out, B, L, valid, pooled)
            return
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32
        s = z.to(acc) + bias
        if res is not None:
            s = s + res.to(acc)
        if res_bias is not None:
            s = s + res_bias
        y = F.layer_norm(s, (s.shape[1],), ln[0].to(acc), ln[1].to(acc), self.config.ln_eps)
        out.copy_(y)
        if pooled is not None:
            w = valid.view(B, L, 1).to(acc)
            pooled.copy_((y.view(B, L, -1) * w).sum(1) / w.sum(1).clamp_min(1))

    def _attend(self, y, hidden, kh, allh, out, B, L):
        cfg = self.config
        D, H = cfg.d_model, cfg.n_heads
        hd = D // H
        if self.attention == "triton":
            from astromer_fast.kernels import _triton_fused_block as tfb

            tfb.attention(y, kh, allh, out, B, L, H, _RULE_ID[cfg.mask_rule],
                          1.0 / math.sqrt(hd), stages=self.stages)
            return
        q, k, v = (y[:, i * D:(i + 1) * D].view(B, L, H, hd).transpose(1, 2) for i in range(3))
        if self.attention == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias(
                hidden, cfg.mask_rule, q.dtype))
        elif self.attention == "cuda_tc":
            o = self._cuda_tc(q, k, v, kh, B, L, H, hd)
        else:
            o = masked_attention_reference(q, k, v, hidden, cfg.mask_rule)[0]
        out.view(B, L, H, hd).copy_(o.transpose(1, 2))

    def _cuda_tc(self, q, k, v, kh, B, L, H, hd):
        from astromer_fast.kernels import _ext

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = torch.empty_like(q)
        lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
        dev, stream = _ext.cuda_device_and_stream(q)
        _ext.require_cuda_ext().masked_attention_forward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), kh.data_ptr(), True, B, H, L, hd,
            _RULE_ID[self.config.mask_rule], 1.0 / math.sqrt(hd), o.data_ptr(), lse.data_ptr(),
            dev, stream, tensor_cores=True)
        return o

    # -- the encoder -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, t: torch.Tensor, m: torch.Tensor, valid: torch.Tensor,
                 layers: bool = False) -> torch.Tensor:
        from astromer_fast.kernels.input_embedding import input_embedding
        from astromer_fast.model.fused_cpu import check_window_inputs

        check_window_inputs(t, m, valid)
        if t.device != self.device:
            raise ValueError(f"the encoder's weights are on {self.device}, the inputs on "
                             f"{t.device}")
        cfg = self.config
        B, L = t.shape
        D, dff = cfg.d_model, cfg.dff
        n_out = cfg.n_blocks + 1 if layers else 1
        # Window means in float32 (float64 for the oracle's float64 runs).
        pooled = torch.zeros(B, n_out, D, device=self.device,
                             dtype=torch.float64 if self.dtype == torch.float64 else torch.float32)
        if B * L == 0:
            return pooled if layers else pooled[:, 0]
        N = B * L
        hidden = ~valid
        kh = hidden.contiguous().view(torch.uint8)
        allh = hidden.all(1).contiguous().view(torch.uint8)
        valid_u8 = valid.contiguous().view(torch.uint8)
        backend = "triton" if self.elementwise == "triton" else "torch"
        # float64 (the oracle's runs) keeps the input embedding in float64 too.
        ft = torch.float64 if self.dtype == torch.float64 else torch.float32
        x = input_embedding(t.to(ft), m.to(ft), hidden if self.token is not None else None,
                            self.mag_w, self.mag_b, self.token, cfg.pe_base, backend=backend)
        dt = self.dtype
        acc = torch.float64 if dt == torch.float64 else torch.float32
        if layers:
            w = valid.unsqueeze(-1).to(acc)
            pooled[:, 0] = (x.to(acc) * w).sum(1) / w.sum(1).clamp_min(1)
        x = x.reshape(N, D).to(dt)
        if self.gemm != "cublas":
            return self._blocks_triton_gemm(x, hidden, kh, allh, valid_u8, pooled, B, L, layers)
        o = torch.empty(N, D, dtype=dt, device=self.device)
        a = torch.empty(N, D, dtype=dt, device=self.device)
        for i, blk in enumerate(self.blocks):
            y = torch.addmm(blk.b_in, x, blk.w_in)
            self._attend(y, hidden, kh, allh, o, B, L)
            z = torch.mm(o, blk.w_o)
            res1 = y[:, 3 * D:] if self.leak else None
            self._residual_ln(z, blk.b_o.to(acc), res1, None, blk.ln1, a, B, L, None, None)
            u = torch.mm(a, blk.w_f1)
            self._bias_tanh(u, blk.b_f1.to(acc), dff)
            z = torch.mm(u[:, :dff], blk.w_f2)
            pool = layers or i == len(self.blocks) - 1
            x = torch.empty(N, D, dtype=dt, device=self.device)
            self._residual_ln(z, blk.b_f2.to(acc), u[:, dff:] if self.leak else None,
                              blk.b_leak2.to(acc) if self.leak else None, blk.ln2, x, B, L,
                              valid_u8, pooled[:, i + 1 if layers else 0] if pool else None)
        return pooled if layers else pooled[:, 0]

    def _blocks_triton_gemm(self, x, hidden, kh, allh, valid_u8, pooled, B, L, layers):
        """The blocks with the element-wise passes in the Triton GEMMs' epilogues."""
        from astromer_fast.kernels import _triton_fused_gemm as tg

        cfg = self.config
        D, dff, N = cfg.d_model, cfg.dff, B * L
        # The one-kernel attention half never writes the attention output O.
        o = None if self.gemm == "triton_block" else \
            torch.empty(N, D, dtype=self.dtype, device=self.device)
        a = torch.empty(N, D, dtype=self.dtype, device=self.device)
        H = cfg.n_heads
        for i, blk in enumerate(self.blocks):
            y = torch.addmm(blk.b_in, x, blk.w_in)
            if self.gemm == "triton_block":
                tg.attention_out_layernorm(y, kh, allh, blk.w_o, blk.b_o,
                                           y[:, 3 * D:] if self.leak else None, *blk.ln1,
                                           cfg.ln_eps, a, B, L, H, _RULE_ID[cfg.mask_rule],
                                           1.0 / math.sqrt(D // H))
            else:
                self._attend(y, hidden, kh, allh, o, B, L)
                tg.gemm_residual_layernorm(o, blk.w_o, blk.b_o,
                                           y[:, 3 * D:] if self.leak else None, None, *blk.ln1,
                                           cfg.ln_eps, a)
            x = torch.empty(N, D, dtype=self.dtype, device=self.device)
            if self.gemm in ("triton_mlp", "triton_block"):
                tg.mlp_residual_layernorm(a, blk.w_f1[:, :dff], blk.b_f1, blk.w_f2, blk.b_f2,
                                          blk.w_f1[:, dff:] if self.leak else None,
                                          blk.b_leak2 if self.leak else None, *blk.ln2,
                                          cfg.ln_eps, x)
            else:
                u = tg.gemm_bias_tanh(a, blk.w_f1, blk.b_f1, dff)
                tg.gemm_residual_layernorm(u[:, :dff], blk.w_f2, blk.b_f2,
                                           u[:, dff:] if self.leak else None,
                                           blk.b_leak2 if self.leak else None, *blk.ln2,
                                           cfg.ln_eps, x)
            if layers or i == len(self.blocks) - 1:
                tg.window_means(x, valid_u8, pooled[:, i + 1 if layers else 0], B, L)
        return pooled if layers else pooled[:, 0]
