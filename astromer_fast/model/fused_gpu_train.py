"""The encoder's training forward in fewer, larger kernels: what ``TrainSettings(gpu_path="fused")``
trains with.

The plain model under bf16 autocast launches, per block, a weight and a bias cast for every Linear,
separate GEMMs for q, k, v and each skip projection (each with its own backward GEMMs and
gradient sums), and rebuilds the attention bias for every block. Here, per step::

    all the blocks' Linear weights and biases cast to the compute dtype in one pass
    (``_PackedWeights``; its backward casts every gradient back in one pass)
    Y = X [Wq; Wk; Wv; Wleak1]^T + b       one GEMM
    O = SDPA(q, k, v, bias)                 q, k, v strided views of Y; one bias per forward
    A = LN1(Y_leak + Dropout(O Wo^T + bo))
    U = A [Wffn1; Wleak2]^T + b             one GEMM
    X = LN2(U_leak + Dropout(tanh(U_ffn) Wffn2^T + bffn2))

The maths and the roundings are the plain model's under autocast (bf16 GEMM outputs and skip
sums, LayerNorm in float32, the same additive mask bias from ``attention_bias``), so the loss
agrees with it within rounding. The input embedding and the regression head are the model's own
modules. The parameters stay the model's float32 masters: the optimizer, checkpoints and
``state_dict`` are unchanged and ``backward()`` leaves ordinary ``.grad`` on them.

Views of one GEMM's output are handed to autograd through ``_SplitColumns``, whose backward
concatenates the pieces' gradients: slicing in autograd would give each piece's gradient as a
zero-filled tensor of the whole output, summed.

With ``dtype`` the parameters' own (float32, float64) nothing is cast: how the tests compare it with
the plain model on the CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from astromer_fast.kernels.masked_attention import sdpa_mask

# The compute dtypes besides the parameters' own (no cast).
LOW_PRECISION = (torch.bfloat16,)


class _PackedWeights(torch.autograd.Function):
    """``params`` (every block's Linear weights and biases, in ``layout``'s order) cast into one
    buffer of ``dtype``; returns the groups of ``layout`` as views of it. The backward gathers the
    groups' gradients into one buffer, casts it back once and hands each parameter a view."""

    @staticmethod
    def forward(ctx, dtype, layout, *params):
        flat = torch.cat([p.reshape(-1) for p in params]).to(dtype)
        ctx.shapes = [p.shape for p in params]
        ctx.param_dtype = params[0].dtype
        return tuple(flat[start:start + math.prod(shape)].view(shape) for start, shape in layout)

    @staticmethod
    def backward(ctx, *grads):
        flat = torch.cat([g.reshape(-1) for g in grads]).to(ctx.param_dtype)
        out, start = [], 0
        for shape in ctx.shapes:
            n = math.prod(shape)
            out.append(flat[start:start + n].view(shape))
            start += n
        return (None, None, *out)


class _SplitColumns(torch.autograd.Function):
    """(N, sum(widths)) -> column blocks of ``widths``, as views; their gradients are
    concatenated back in one pass."""

    @staticmethod
    def forward(ctx, y, widths):
        return tuple(y.split(widths, dim=1))

    @staticmethod
    def backward(ctx, *grads):
        return torch.cat(grads, dim=1), None


def _linear_params(blk) -> list[tuple[str, list[torch.Tensor]]]:
    """One block's Linear parameters by group, in the order the packed buffer holds them: each
    group's members are consecutive, so a group is one contiguous view (rows of one matrix)."""
    a = blk.attn
    leak = blk.leak1 is not None
    return [
        ("w_in", [a.wq.weight, a.wk.weight, a.wv.weight] + ([blk.leak1.weight] if leak else [])),
        ("b_in", [a.wq.bias, a.wk.bias, a.wv.bias] + ([blk.leak1.bias] if leak else [])),
        ("w_o", [a.wo.weight]),
        ("b_o", [a.wo.bias]),
        ("w_f1", [blk.ffn1.weight] + ([blk.leak2.weight] if leak else [])),
        ("b_f1", [blk.ffn1.bias] + ([blk.leak2.bias] if leak else [])),
        ("w_f2", [blk.ffn2.weight]),
        ("b_f2", [blk.ffn2.bias]),
    ]


def packed_block_weights(model, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Per block, its concatenated Linear weights and biases in ``dtype`` (``w_in``: (3D or 4D, D),
    ``b_in``, ``w_o``, ``b_o``, ``w_f1``: (dff [+ D], D), ``b_f1``, ``w_f2``, ``b_f2``), all cast in
    one pass and differentiable back to the model's parameters."""
    params, layout, names = [], [], []
    start = 0
    for blk in model.blocks:
        block_names = []
        for name, members in _linear_params(blk):
            rows = sum(p.shape[0] for p in members)
            shape = (rows,) + tuple(members[0].shape[1:])
            layout.append((start, shape))
            start += math.prod(shape)
            params.extend(members)
            block_names.append(name)
        names.append(block_names)
    views = iter(_PackedWeights.apply(dtype, layout, *params))
    return [{name: next(views) for name in block_names} for block_names in names]


def check_dtype(model, dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if the fused training forward computes in it for ``model``, else a ValueError."""
    param_dtype = next(model.parameters()).dtype
    if dtype != param_dtype and dtype not in LOW_PRECISION:
        raise ValueError(f"the fused training forward computes in bfloat16 or in the parameters' "
                         f"dtype ({param_dtype}), got {dtype}")
    return dtype


def fused_train_encode(model, t: torch.Tensor, m: torch.Tensor, hidden: torch.Tensor, *,
                       dtype: torch.dtype | None = None, backend: str | None = None
                       ) -> torch.Tensor:
    """The last block's output (B, L, D) of ``model`` (an ``Astromer``) for the same inputs as
    ``Astromer.encode``; dropout as the model's modules are set (train or eval). ``dtype``: the
    GEMMs' and the attention's dtype (default: the parameters'; ``torch.bfloat16`` on CUDA, as
    autocast computes them). ``backend``: the input embedding's kernel backend. The output is
    float32 for bf16 (the LayerNorm's dtype, as under autocast), else ``dtype``."""
    from astromer_fast.model.astromer import _check_inputs

    t, m, hidden = _check_inputs(t, m, hidden)
    cfg = model.config
    dt = check_dtype(model, dtype or next(model.parameters()).dtype)
    B, L = t.shape
    N, D, H = B * L, cfg.d_model, cfg.n_heads
    hd = D // H
    leak = cfg.use_leak
    qkv_widths = [D, D, D] + ([D] if leak else [])
    ffn_widths = [cfg.dff] + ([D] if leak else [])

    x = model.dropout(model.embedding(t, m, hidden, backend=backend)).reshape(N, D)
    blocks = packed_block_weights(model, dt)
    # One mask per forward, with SDPA's backward routed around windows whose keys are all hidden.
    bias, query_keep = sdpa_mask(hidden, cfg.mask_rule, dt, for_gradient=True)
    for blk, w in zip(model.blocks, blocks):
        y = F.linear(x.to(dt), w["w_in"], w["b_in"])
        q, k, v, *y_leak = _SplitColumns.apply(y, qkv_widths)
        q, k, v = (z.view(B, L, H, hd).transpose(1, 2) for z in (q, k, v))
        if query_keep is not None:
            q = q * query_keep
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        a = blk.dropout(F.linear(o.transpose(1, 2).reshape(N, D), w["w_o"], w["b_o"]))
        if leak:
            a = y_leak[0] + a
        # LayerNorm in the parameters' dtype (float32 under bf16), as autocast runs it.
        a = F.layer_norm(a.to(blk.ln1.weight.dtype), (D,), blk.ln1.weight, blk.ln1.bias,
                         blk.ln1.eps)
        u = F.linear(a.to(dt), w["w_f1"], w["b_f1"])
        u_ffn, *u_leak = _SplitColumns.apply(u, ffn_widths) if leak else (u,)
        f = blk.dropout(F.linear(torch.tanh(u_ffn), w["w_f2"], w["b_f2"]))
        if leak:
            f = u_leak[0] + f
        x = F.layer_norm(f.to(blk.ln2.weight.dtype), (D,), blk.ln2.weight, blk.ln2.bias,
                         blk.ln2.eps)
    return x.view(B, L, D)


def fused_train_forward(model, t: torch.Tensor, m: torch.Tensor, hidden: torch.Tensor, *,
                        dtype: torch.dtype | None = None, backend: str | None = None
                        ) -> torch.Tensor:
    """Reconstructed magnitude per observation (B, L), as ``Astromer.forward``: the fused encoder,
    then the model's regression head (under autocast for a low-precision ``dtype``, so that its
    projection rounds as the plain model's does)."""
    x = fused_train_encode(model, t, m, hidden, dtype=dtype, backend=backend)
    low = dtype in LOW_PRECISION
    with torch.autocast(device_type=x.device.type, dtype=dtype if low else torch.bfloat16,
                        enabled=low):
        return model.head(x)
