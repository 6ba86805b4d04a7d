"""Dynamic symmetric activation quantization per token (or per token-group) to fp8 or int8.

One pass: each program reads one (token, group) run, takes its absmax, writes the codes and
the scale. group = K is per-token (row-wise FP8 / INT8 W8A8); group = 128 feeds block FP8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.triton.common import pdl, pdl_enter

QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
EPS = 1e-10  # all-zero rows get a tiny scale instead of a division by zero


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr,
    EPS: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    m = tl.program_id(0)
    g = tl.program_id(1)
    k = g * GROUP + tl.arange(0, BLOCK)
    mask = (k < K) & (tl.arange(0, BLOCK) < GROUP)
    x = tl.load(x_ptr + m * stride_xm + k, mask=mask, other=0.0).to(tl.float32)
    y, scale = quantize_block(x, QMAX, IS_INT, EPS)
    tl.store(q_ptr + m * stride_qm + k, y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + m * stride_sm + g, scale)


@triton.jit
def quantize_block(x, QMAX: tl.constexpr, IS_INT: tl.constexpr, EPS: tl.constexpr):
    """(codes as float32, scale) of a 1-D float32 block (masked lanes 0): scale = absmax / QMAX;
    int8 rounds half away from zero and saturates. Shared by the kernels that quantize their
    own output (RMSNorm, SwiGLU), so theirs equal this kernel's codes bit for bit."""
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), EPS) / QMAX
    return quantize_with(x, scale, QMAX, IS_INT), scale


@triton.jit
def quantize_with(x, scale, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """The codes (as float32) of float32 x at a given scale (broadcast against x): x / scale,
    int8 rounded half away from zero and saturated, fp8 saturated at ±QMAX (the caller's cast
    to e4m3 rounds). `quantize_block`'s second half; the W8A8 GEMV quantizes SwiGLU's output
    with it as it loads x (`dispatch.DeferredQuant`)."""
    y = x / scale
    if IS_INT:
        y = tl.clamp(tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5)), -128.0, 127.0)
    else:
        y = tl.clamp(y, -QMAX, QMAX)
    return y


def act_quant(
    x: Tensor, dtype: torch.dtype, group_size: int | None = None, qmax: float | None = None
) -> tuple[Tensor, Tensor]:
    """Quantize rows of x to `dtype` with one float32 scale per (row, group).

    x        (M, K)          bf16 / fp16 / fp32, unit last stride
    qmax     divisor of the absmax (default 448 fp8, 127 int8; compressed-tensors int8: 127.5)
    returns  q (M, K) dtype, scales (M, K // group) float32 (group None → K, scales (M, 1))
    """
    assert x.dim() == 2 and x.stride(-1) == 1, (x.shape, x.stride())
    assert dtype in QMAX, f"dtype {dtype}; supported {list(QMAX)}"
    M, K = x.shape
    group = group_size or K
    assert K % group == 0, f"K={K} is not a multiple of the group size {group}"
    q = torch.empty(M, K, dtype=dtype, device=x.device)
    s = torch.empty(M, K // group, dtype=torch.float32, device=x.device)
    if M == 0:
        return q, s
    block = triton.next_power_of_2(group)
    _act_quant_kernel[(M, K // group)](
        x, q, s, K, x.stride(0), q.stride(0), s.stride(0),
        GROUP=group, BLOCK=block, QMAX=float(qmax or QMAX[dtype]), IS_INT=dtype == torch.int8,
        EPS=EPS,
        **pdl(x.device), num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return q, s
