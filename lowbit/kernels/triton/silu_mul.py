"""SwiGLU activation: silu(gate) · up from the fused gate_up output, in one pass; optionally
quantized per token for a W8A8 down projection in the same pass.

The per-token scale needs the whole row, so the quantizing kernel is one program a row. Where
the W8A8 consumer is the GEMV (`w8a8_gemm.gemv_path`: decode at batch 1, one program for 14,336
values) the row instead runs on many programs, each writing its values and their absmax, and
the GEMV quantizes as it loads them (`dispatch.DeferredQuant`): the same codes, one short
launch instead of a long one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.dispatch import DeferredQuant, QuantizedActivation
from lowbit.kernels.triton.act_quant import EPS, QMAX, quantize_block
from lowbit.kernels.triton.common import pdl, pdl_enter
from lowbit.kernels.triton.w8a8_gemm import gemv_path

BLOCK = 1024
# Code dtypes for which a quantized SwiGLU leaves the quantization to its W8A8 GEMV consumer.
# H100, batch-1 decode, tok/s deferred vs not, two runs each (benchmarks/RESULTS.md run 13):
# int8 277 / 278 vs 272 / 273; fp8 265 / 266 vs 270 / 270 (the GEMV's x to e4m3 and back costs
# more than the launch saves)
DEFER_DTYPES = (torch.int8,)


@triton.jit
def _silu_mul_kernel(
    x_ptr, out_ptr, amax_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr,
    AMAX: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """AMAX: each program also writes its values' absmax at amax[row, program]."""
    pdl_enter(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    h = _swiglu(x_ptr + row * stride_x, cols, mask, n_cols)  # 0 where masked
    tl.store(out_ptr + row * stride_o + cols, h, mask=mask)
    if AMAX:
        tl.store(amax_ptr + row * tl.num_programs(1) + tl.program_id(1),
                 tl.max(tl.abs(h.to(tl.float32)), axis=0))  # fmt: skip


@triton.jit
def _swiglu(x_row, cols, mask, n_cols):
    """silu(gate) · up of one row's columns, in the input dtype."""
    gate = tl.load(x_row + cols, mask=mask, other=0.0)
    up = tl.load(x_row + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # torch's silu rounds to the input dtype
    return act * up


@triton.jit
def _silu_mul_quant_kernel(
    x_ptr, q_ptr, s_ptr, n_cols, stride_x, stride_q,
    BLOCK: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr, EPS: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    # one program a row: the per-token scale needs the whole row
    pdl_enter(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    h = _swiglu(x_ptr + row * stride_x, cols, mask, n_cols)
    q, scale = quantize_block(h.to(tl.float32), QMAX, IS_INT, EPS)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def silu_mul(x: Tensor, quant=None):
    """x (…, 2·I) = [gate | up] → silu(gate) · up (…, I).

    quant  None, or (dtype, qmax): the result quantized per token (int8 / float8_e4m3fn,
           scale = absmax / qmax), returned as a dispatch.QuantizedActivation (up to
           rows the GEMV takes, of a DEFER_DTYPES dtype, a dispatch.DeferredQuant: values
           and partial absmaxes)
    """
    two_i = x.shape[-1]
    assert two_i % 2 == 0, x.shape
    I = two_i // 2  # noqa: E741
    x2 = x.reshape(-1, two_i)
    assert x2.stride(-1) == 1, x.stride()
    M = x2.shape[0]
    if quant is not None and quant[0] in DEFER_DTYPES and M and gemv_path(M):
        qdtype, qmax = quant
        out = torch.empty(M, I, dtype=x.dtype, device=x.device)
        amax = torch.empty(M, triton.cdiv(I, BLOCK), dtype=torch.float32, device=x.device)
        _launch(x2, out, amax)
        lead = x.shape[:-1]
        return DeferredQuant(out.reshape(*lead, I), amax,
                             qdtype, float(qmax or QMAX[qdtype]))  # fmt: skip
    if quant is not None:
        qdtype, qmax = quant
        q = torch.empty(M, I, dtype=qdtype, device=x.device)
        scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(I)
        if M:
            _silu_mul_quant_kernel[(M,)](
                x2, q, scale, I, x2.stride(0), q.stride(0), BLOCK=block,
                QMAX=float(qmax or QMAX[qdtype]), IS_INT=qdtype == torch.int8, EPS=EPS,
                **pdl(x2.device), num_warps=min(16, max(1, block // 512)),
            )  # fmt: skip
        lead = x.shape[:-1]
        return QuantizedActivation(q.reshape(*lead, I), scale.reshape(*lead, 1), x.dtype)
    out = torch.empty(M, I, dtype=x.dtype, device=x.device)
    if M:
        _launch(x2, out, None)
    return out.reshape(*x.shape[:-1], I)


def _launch(x2: Tensor, out: Tensor, amax: Tensor | None) -> None:
    """SwiGLU of x2's rows (M, 2I) into out (M, I): programs of BLOCK columns, each writing its
    absmax at amax (M, programs) when given."""
    M, I = out.shape  # noqa: E741
    _silu_mul_kernel[(M, triton.cdiv(I, BLOCK))](
        x2, out, amax if amax is not None else out, I, x2.stride(0), out.stride(0), BLOCK=BLOCK,
        AMAX=amax is not None, **pdl(x2.device), num_warps=4,
    )  # fmt: skip
