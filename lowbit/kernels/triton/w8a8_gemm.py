"""W8A8 GEMM (INT8 or FP8 e4m3): 8-bit × 8-bit on the tensor cores, dequant in the epilogue.

y[m, n] = (Σ_k xq[m, k] · wq[n, k]) · xs[m] · ws[n] (+ bias[n])
Activations are quantized per token (dynamic, one fused pass) or by one static scale. Small M
splits K across programs so batch-1 decode fills the GPU; partial sums are reduced in fp32.
INT8 is the main path for every M; for FP8 it serves small M, where it beats torch._scaled_mm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.dispatch import DeferredQuant, QuantizedActivation
from lowbit.kernels.triton.act_quant import act_quant
from lowbit.kernels.triton.common import pdl, pdl_enter
from lowbit.kernels.triton.w8a8_gemv import w8a8_gemv

NUM_SMS = 132
# At M = 1 the CUDA-core GEMV (w8a8_gemv.py, `GEMV_CONFIG`: 8-row blocks, 512-wide K tiles,
# loads 3 deep) replaces the MMA kernel. H100, run 8 of benchmarks/RESULTS.md (FP8, µs, act
# quant included): qkv 15.7 → 13.2, o 14.0 → 10.0, gate_up 50.1 → 48.3, down 32.7 → 27.1 over
# the previous routing (GEMV with 16-row blocks on qkv/gate_up, the MMA kernel on o/down).
GEMV_CONFIG = {"bn": 8, "bk": 512, "stages": 3, "waves": 8}
# ... but weights of at most GEMV_NARROW_N rows (o_proj, down_proj of an 8B) take 4-row blocks:
# twice the programs, where 8-row blocks fill 0.73 of a wave of the SMs (ncu, o). H100,
# benchmarks/RESULTS.md run 14, FP8 µs at M = 1: o 11.5 → 10.0, down 28.3 → 27.1; qkv (6144
# rows) 13.1 → 14.2 and gate_up 48.4 → 50.2 with 4-row blocks, so they keep 8.
GEMV_NARROW_N = 4096


def gemv_config(N: int) -> dict:
    """The GEMV's launch config at M = 1 for a weight of N rows."""
    return {**GEMV_CONFIG, "bn": 4} if N <= GEMV_NARROW_N else GEMV_CONFIG


def gemv_path(M: int) -> bool:
    """Whether dispatch's default for this shape is the CUDA-core GEMV."""
    return M == 1


def _config(M: int, N: int, K: int, **over) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) by problem size; `over`
    replaces any of bn, bk, split, warps, stages (tuning probes)."""
    if M <= 16:
        bm, bn, bk, warps, stages = 16, 64, 256, 4, 4
    elif M <= 64:
        bm, bn, bk, warps, stages = 64, 64, 128, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 128, 8, 3
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    k_iters = triton.cdiv(K, bk)
    split = 1
    while tiles * split < 2 * NUM_SMS and k_iters // (split * 2) >= 4 and M <= 64:
        split *= 2
    c = {"bn": bn, "bk": bk, "split": split, "warps": warps, "stages": stages, **over}
    return bm, c["bn"], c["bk"], c["split"], c["warps"], c["stages"]


@triton.jit
def _w8a8_gemm_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_xsm, stride_os, stride_om,
    IS_INT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    if IS_INT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    for kt in range(pid_k * per_split, tl.minimum((pid_k + 1) * per_split, k_tiles)):
        rk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]  # (BM, BK) 8-bit
        w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None]  # (BK, BN) 8-bit
        x_mask = m_mask[:, None] & k_mask[None, :]
        w_mask = n_mask[None, :] & k_mask[:, None]
        if IS_INT:
            x = tl.load(x_ptrs, mask=x_mask, other=0)
            w = tl.load(w_ptrs, mask=w_mask, other=0)
        else:  # fp8 pointers take a float fill value
            x = tl.load(x_ptrs, mask=x_mask, other=0.0)
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        acc += tl.dot(x, w)
    xs = tl.load(xs_ptr + rm * stride_xsm, mask=m_mask, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def w8a8_gemm(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    input_scale: Tensor | None = None,
    bias: Tensor | None = None,
    qmax: float | None = None,
    config: dict | None = None,
) -> Tensor:
    """x @ dequant(W)^T (+ bias), x quantized to W's dtype per token (or by a static scale).

    x             (..., K)   bf16 / fp16, or a dispatch.QuantizedActivation of W's dtype (codes
                             and per-token scales from the producing kernel: used as they are)
    weight        (N, K)     int8 or float8_e4m3fn, per output channel (or per tensor) scale
    weight_scale  (N,) / (N, 1) / () / (1,)   float32
    input_scale   () / (1,)  float32 static per-tensor scale, or None for dynamic per token
    qmax          dynamic scale divisor (default 127 int8 / 448 fp8; compressed-tensors 127.5)
    config        tuning: {"path": "gemv" | "mma", and that path's launch overrides}
    returns       (..., N)   x.dtype
    """
    N, K = weight.shape
    assert x.shape[-1] == K, (x.shape, weight.shape)
    assert weight.dtype in (torch.int8, torch.float8_e4m3fn), weight.dtype
    assert weight.stride(-1) == 1, weight.stride()
    ws = weight_scale.reshape(-1).float()
    assert ws.numel() in (1, N), weight_scale.shape
    ws = ws.expand(N).contiguous() if ws.numel() == 1 else ws
    lead = x.shape[:-1]
    is_int = weight.dtype == torch.int8
    over = dict(config or {})
    path = over.pop("path", None)
    if path is None and gemv_path(x.numel() // K):
        path, over = "gemv", gemv_config(N)
    if isinstance(x, DeferredQuant) and path == "gemv":  # quantized as the GEMV loads it
        assert input_scale is None, "a DeferredQuant is per token"
        return w8a8_gemv(x, None, weight, ws, bias, x.dtype, over).reshape(*lead, N)
    if isinstance(x, QuantizedActivation):
        assert x.q.dtype == weight.dtype and input_scale is None, (x.q.dtype, weight.dtype)
        xq, xs = x.rows()
    elif input_scale is None:
        xq, xs = act_quant(x.reshape(-1, K).contiguous(), weight.dtype, None, qmax)
    else:
        s = input_scale.reshape(()).float()
        lo, hi = (-128.0, 127.0) if is_int else (-448.0, 448.0)
        y = x.reshape(-1, K).float() / s
        xq = (y.round() if is_int else y).clamp(lo, hi).to(weight.dtype)
        xs = s.expand(xq.shape[0], 1)
    M = xq.shape[0]  # xq (M, K), xs (M, 1)
    if path == "gemv":
        return w8a8_gemv(xq, xs, weight, ws, bias, x.dtype, over).reshape(*lead, N)
    bm, bn, bk, split, warps, stages = _config(M, N, K, **over)
    if split == 1:
        out = torch.empty(1, M, N, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split)
    has_bias = bias is not None and split == 1
    _w8a8_gemm_kernel[grid](
        xq, weight, xs, ws, bias if has_bias else ws, out, M, N, K,
        xq.stride(0), weight.stride(0), xs.stride(0), out.stride(0), out.stride(1),
        IS_INT=is_int, HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
        **pdl(out.device), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    y = out[0] if split == 1 else out.sum(0)
    if bias is not None and not has_bias:
        y = y + bias
    return y.to(x.dtype).reshape(*lead, N)
