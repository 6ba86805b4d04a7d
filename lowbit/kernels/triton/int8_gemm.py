"""INT8 W8A8 GEMM: int8 × int8 → int32 on the tensor cores, dequant fused in the epilogue.

y[m, n] = (Σ_k xq[m, k] · wq[n, k]) · xs[m] · ws[n] (+ bias[n])
Activations are quantized per token (dynamic) or carry one static scale broadcast over M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.triton.act_quant import act_quant


def _config(M: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by M."""
    if M <= 16:
        return 16, 64, 256, 4, 4
    if M <= 64:
        return 64, 64, 128, 4, 4
    return 128, 128, 128, 8, 3


@triton.jit
def _int8_gemm_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_xsm, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0,
        )  # (BM, BK) int8
        w = tl.load(
            w_ptr + rn[None, :] * stride_wn + rk[:, None],
            mask=n_mask[None, :] & k_mask[:, None],
            other=0,
        )  # (BK, BN) int8
        acc += tl.dot(x, w)
    xs = tl.load(xs_ptr + rm * stride_xsm, mask=m_mask, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def int8_gemm(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    input_scale: Tensor | None = None,
    bias: Tensor | None = None,
    qmax: float | None = None,
) -> Tensor:
    """x @ dequant(W)^T (+ bias) with x quantized to int8 per token (or by a static scale).

    x             (..., K)   bf16 / fp16
    weight        (N, K)     int8, per output channel scale
    weight_scale  (N,)       float32 (shape (N, 1) accepted)
    input_scale   ()/(1,)    float32 static per-tensor scale, or None for dynamic per token
    qmax          dynamic scale divisor (default 127; compressed-tensors uses 127.5)
    returns       (..., N)   x.dtype
    """
    N, K = weight.shape
    assert x.shape[-1] == K, (x.shape, weight.shape)
    assert weight.dtype == torch.int8 and weight.stride(-1) == 1, weight.dtype
    ws = weight_scale.reshape(-1).float()
    assert ws.shape == (N,), weight_scale.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if input_scale is None:
        xq, xs = act_quant(x2, torch.int8, None, qmax)  # (M, K), (M, 1)
    else:
        s = input_scale.reshape(()).float()
        xq = (x2.float() / s).round().clamp(-128, 127).to(torch.int8)
        xs = s.expand(M, 1)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bm, bn, bk, warps, stages = _config(M)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _int8_gemm_kernel[grid](
        xq, weight, xs, ws, bias if bias is not None else ws, out, M, N, K,
        xq.stride(0), weight.stride(0), xs.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out.reshape(*lead, N)
