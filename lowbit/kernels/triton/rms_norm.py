"""Fused (residual add +) RMSNorm: one read of x (and residual), one write of each output.

Matches lowbit.layers.norm.RMSNorm: variance in float32, normalized value cast to the input
dtype before the weight multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.dispatch import QuantizedActivation
from lowbit.kernels.triton.act_quant import EPS, QMAX, quantize_block
from lowbit.kernels.triton.common import pdl, pdl_enter

# The norm's weight is loaded before the PDL wait (no kernel writes it), off the critical path.
# H100, batch-1 decode tok/s (benchmarks/RESULTS.md run 15, off → on): fp8 287 → 291, w4a16 408
# → 409; batch 64 unchanged (fp8 11,730 → 11,683, w4a16 7,621 → 7,658). An A/B switch.
EARLY_WEIGHT = True


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, rout_ptr, s_ptr, N, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
    IS_INT: tl.constexpr, EPS: tl.constexpr, EARLY_W: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if EARLY_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    pdl_enter(PDL)
    row = tl.program_id(0)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(rout_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    y = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    if not EARLY_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w * y).to(x.dtype)
    if QUANT:  # out_ptr takes the per-token codes, as act_quant would make them from `out`
        out, scale = quantize_block(out.to(tl.float32), QMAX, IS_INT, EPS)
        tl.store(s_ptr + row, scale)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None, quant=None):
    """RMSNorm of x (…, N); with `residual`, normalize x + residual and also return the sum.

    x, residual  (…, N)   same dtype
    weight       (N,)
    quant        None, or (dtype, qmax): the output quantized per token (int8 / float8_e4m3fn,
                 scale = absmax / qmax) and returned as a dispatch.QuantizedActivation
    returns      out (…, N)  [, new residual (…, N)]
    """
    N = x.shape[-1]
    assert weight.shape == (N,), (weight.shape, x.shape)
    x2 = x.reshape(-1, N)
    assert x2.stride(-1) == 1, x.stride()
    M = x2.shape[0]
    qdtype, qmax = quant or (None, None)
    out = torch.empty(M, N, dtype=qdtype or x.dtype, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device) if quant else out
    r2 = rout = x2
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, residual.shape
        r2 = residual.reshape(-1, N)
        rout = torch.empty_like(x2)
    block = triton.next_power_of_2(N)
    if M:
        _rms_norm_kernel[(M,)](
            x2, r2, weight, out, rout, scale, N, eps,
            x2.stride(0), r2.stride(0), out.stride(0), rout.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, QUANT=quant is not None,
            QMAX=float(qmax or QMAX.get(qdtype, 1.0)), IS_INT=qdtype == torch.int8, EPS=EPS,
            EARLY_W=EARLY_WEIGHT, **pdl(x2.device),
            num_warps=min(16, max(1, block // 512)),
        )  # fmt: skip
    if quant is None:
        out = out.reshape(x.shape)
    else:
        out = QuantizedActivation(out.reshape(x.shape), scale.reshape(*x.shape[:-1], 1), x.dtype)
    return out if residual is None else (out, rout.reshape(x.shape))
