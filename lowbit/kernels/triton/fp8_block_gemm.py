"""Block-scaled FP8 GEMM (DeepSeek-style 128×128 weight blocks, 1×128 activation groups).

y[m, n] = Σ_kb (Σ_{k in kb} xq[m, k] · wq[n, k]) · xs[m, kb] · ws[n // BN_W, kb]
Activations are quantized per token and 128-wide K group in one pass (act_quant) right before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.triton.act_quant import act_quant
from lowbit.kernels.triton.common import pdl, pdl_enter

NUM_SMS = 132


def _config(M: int, N: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_K is the 128-wide scale block."""
    if M <= 16:
        return 16, 64, 4, 4
    if M <= 64:
        return 64, 64, 4, 4
    return 128, 128, 8, 3


@triton.jit
def _fp8_block_gemm_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_xsm, stride_wsn, stride_om,
    BLOCK_WN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )  # (BM, BK) fp8
        w = tl.load(
            w_ptr + rn[None, :] * stride_wn + rk[:, None],
            mask=n_mask[None, :] & k_mask[:, None],
            other=0.0,
        )  # (BK, BN) fp8
        xs = tl.load(xs_ptr + rm * stride_xsm + kb, mask=m_mask, other=0.0)  # (BM,)
        ws = tl.load(ws_ptr + (rn // BLOCK_WN) * stride_wsn + kb, mask=n_mask, other=0.0)  # (BN,)
        acc += tl.dot(x, w) * xs[:, None] * ws[None, :]
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def fp8_block_gemm(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    block_size: tuple[int, int] = (128, 128),
    bias: Tensor | None = None,
) -> Tensor:
    """x @ dequant(W)^T (+ bias) for a 128×128 block-scaled FP8 weight; x quantized per group.

    x             (..., K)                     bf16 / fp16
    weight        (N, K)                       float8_e4m3fn
    weight_scale  (ceil(N/bn), ceil(K/bk))     float32, the dequant multiplier of each block
    returns       (..., N)                     x.dtype
    """
    bn_w, bk = block_size
    N, K = weight.shape
    assert x.shape[-1] == K, (x.shape, weight.shape)
    assert weight.dtype == torch.float8_e4m3fn and weight.stride(-1) == 1, weight.dtype
    assert bk == 128 and K % bk == 0, f"K={K} must be a multiple of the 128 K-block"
    assert weight_scale.shape == (triton.cdiv(N, bn_w), K // bk), weight_scale.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    xq, xs = act_quant(x2, torch.float8_e4m3fn, bk)  # (M, K), (M, K / 128)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bm, bn, warps, stages = _config(M, N)
    bn = min(bn, bn_w)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _fp8_block_gemm_kernel[grid](
        xq, weight, xs, weight_scale, out, M, N, K,
        xq.stride(0), weight.stride(0), xs.stride(0), weight_scale.stride(0), out.stride(0),
        BLOCK_WN=bn_w, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        **pdl(out.device), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, N)
