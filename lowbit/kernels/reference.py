"""Pure-torch reference of every op: the CPU path and the oracle for the Triton kernels.

Weights arrive packed; each GEMM dequantizes its weight in float32 for the call, simulates the
activation quantization the format defines, and multiplies in float32. Packing helpers and the
small-float code tables live in `lowbit.kernels.codes`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.kernels.codes import (
    MX_BLOCK,
    e2m1_decode,
    e2m1_round,
    e8m0_ceil,
    e8m0_decode,
    nf4_like_decode,
    unpack_fp4,
    unpack_int32,
)

FP8_MAX = 448.0
ACT_EPS = 1e-10  # all-zero rows get a tiny scale instead of a division by zero (as in Triton)


def _finish(y: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Add the bias in float32 and cast to the activation dtype."""
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


# ---- weight-only int (canonical wNa16 layout, see lowbit/quant/schemes/wna16.py) ----


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight^T (+ bias) for a full-precision weight."""
    return F.linear(x, weight, bias)


def dequant_wna16(
    qweight: Tensor, scales: Tensor, qzeros: Tensor | None, group_size: int, bits: int
) -> Tensor:
    """Canonical packed (K, N/P) codes → float32 W^T (K, N)."""
    K, N = qweight.shape[0], scales.shape[1]
    q = unpack_int32(qweight, bits, dim=1, length=N).float()  # (K, N)
    if qzeros is None:
        z = torch.full_like(scales, 2 ** (bits - 1), dtype=torch.float32)  # (K/G, N)
    else:
        z = unpack_int32(qzeros, bits, dim=1, length=N).float()
    g = torch.arange(K, device=qweight.device) // group_size  # (K,)
    return (q - z[g]) * scales.float()[g]


def wna16_gemm(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    qzeros: Tensor | None,
    group_size: int,
    bits: int = 4,
    bias: Tensor | None = None,
    perm: Tensor | None = None,
) -> Tensor:
    """x (…, K) @ dequant(W)^T (+ bias) → (…, N); `perm` reorders x's columns (act-order)."""
    wt = dequant_wna16(qweight, scales, qzeros, group_size, bits)  # (K, N)
    xf = x.float()
    if perm is not None:
        xf = xf[..., perm]
    return _finish(xf @ wt, bias, x.dtype)


# ---- activation quantization ----


def act_quant(
    x: Tensor, dtype: torch.dtype, group_size: int | None = None, qmax: float | None = None
) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric quantization of x (M, K) per row (or row-group) → (codes, fp32 scales).

    `qmax` is the divisor of the absmax (448 fp8, 127 int8; compressed-tensors int8 uses 127.5).
    """
    M, K = x.shape
    group = group_size or K
    qmax = qmax or (127.0 if dtype == torch.int8 else FP8_MAX)
    xg = x.float().reshape(M, K // group, group)  # (M, K/G, G)
    scale = xg.abs().amax(-1, keepdim=True).clamp(min=ACT_EPS) / qmax  # (M, K/G, 1)
    q = _to_codes(xg / scale, dtype)
    return q.reshape(M, K), scale.squeeze(-1)


def _to_codes(y: Tensor, dtype: torch.dtype) -> Tensor:
    """Scaled float32 values → int8 (round half to even, saturate) or fp8 (saturating cast)."""
    if dtype == torch.int8:
        return y.round().clamp(-128, 127).to(torch.int8)
    lim = torch.finfo(dtype).max
    return y.clamp(-lim, lim).to(dtype)


def fake_quant_act(
    x: Tensor,
    dtype: torch.dtype,
    scale: Tensor | None = None,
    group_size: int | None = None,
    qmax: float | None = None,
) -> Tensor:
    """x quantized to `dtype` and back (float32): static per-tensor `scale`, else dynamic."""
    K = x.shape[-1]
    x2 = x.float().reshape(-1, K)
    if scale is not None:
        s = scale.float().reshape(())
        return (_to_codes(x2 / s, dtype).float() * s).reshape(x.shape)
    q, s = act_quant(x2, dtype, group_size, qmax)
    group = group_size or K
    s = s.repeat_interleave(group, dim=1)  # (M, K)
    return (q.float() * s).reshape(x.shape)


# ---- FP8 / INT8 W8A8 ----


def _channel_scale(weight_scale: Tensor, n: int) -> Tensor:
    """() / (1,) / (N,) / (N, 1) scale → float32 (N, 1) or (1, 1)."""
    ws = weight_scale.float().reshape(-1)
    return ws.reshape(1, 1) if ws.numel() == 1 else ws.reshape(n, 1)


def fp8_scaled_mm(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    input_scale: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """FP8 W8A8, per-tensor/per-channel weight scale; static per-tensor or per-token activations."""
    w = weight.float() * _channel_scale(weight_scale, weight.shape[0])  # (N, K)
    xq = fake_quant_act(x, torch.float8_e4m3fn, input_scale)
    return _finish(xq @ w.t(), bias, x.dtype)


def w8a8_codes_gemm(
    q: Tensor, scale: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, dtype
) -> Tensor:
    """The W8A8 product of activations already quantized per token (codes q (…, K), float32
    scales (…, 1)) with a per-tensor/per-channel 8-bit weight, cast to `dtype`: what
    `fp8_scaled_mm` / `int8_gemm` compute after quantizing their input."""
    w = weight.float() * _channel_scale(weight_scale, weight.shape[0])  # (N, K)
    return _finish((q.float() * scale.float()) @ w.t(), bias, dtype)


def dequant_block(weight: Tensor, weight_scale: Tensor, block_size: tuple[int, int]) -> Tensor:
    """(N, K) codes with (ceil(N/bn), ceil(K/bk)) multipliers → float32 (N, K)."""
    bn, bk = block_size
    N, K = weight.shape
    s = weight_scale.float().repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:N, :K]
    return weight.float() * s


def fp8_block_gemm(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    block_size: tuple[int, int] = (128, 128),
    bias: Tensor | None = None,
) -> Tensor:
    """FP8 W8A8 with block weight scales and 1×bk dynamic activation groups."""
    w = dequant_block(weight, weight_scale, block_size)  # (N, K)
    xq = fake_quant_act(x, torch.float8_e4m3fn, group_size=block_size[1])
    return _finish(xq @ w.t(), bias, x.dtype)


def int8_gemm(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    input_scale: Tensor | None = None,
    bias: Tensor | None = None,
    qmax: float | None = None,
) -> Tensor:
    """INT8 W8A8: per-channel int8 weight; per-token dynamic (or static per-tensor) activations."""
    w = weight.float() * _channel_scale(weight_scale, weight.shape[0])  # (N, K)
    xq = fake_quant_act(x, torch.int8, input_scale, qmax=qmax)
    return _finish(xq @ w.t(), bias, x.dtype)


# ---- FP4 (NVFP4 / MXFP4) ----


def dequant_fp4(packed: Tensor, block_scale: Tensor, group_size: int) -> Tensor:
    """(N, K/2) e2m1 bytes with (N, K/G) float32 block scales → float32 (N, K)."""
    w = e2m1_decode(unpack_fp4(packed))  # (N, K)
    return w * block_scale.float().repeat_interleave(group_size, dim=1)[:, : w.shape[1]]


def fake_quant_nvfp4_act(
    x: Tensor, global_scale: Tensor, group_size: int = 16, divisor: bool = False
) -> Tensor:
    """NVFP4 activation simulation: fp8 block scales of amax/6 under a per-tensor scale.

    `global_scale` multiplies the block scales (ModelOpt `input_scale`), or divides them when
    `divisor` (compressed-tensors `input_global_scale`, computed the way the tool does).
    """
    K = x.shape[-1]
    xg = x.float().reshape(-1, K // group_size, group_size)  # (M, K/16, 16)
    gs = global_scale.float().reshape(())
    amax6 = xg.abs().amax(-1, keepdim=True) / 6.0
    bs = (amax6 * gs if divisor else amax6 / gs).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    scale = bs.float() / gs if divisor else bs.float() * gs  # (M, K/16, 1)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = e2m1_round((xg / safe).clamp(-6.0, 6.0))
    return (q * scale).reshape(x.shape)


def fp4_gemm(
    x: Tensor,
    packed: Tensor,
    block_scale: Tensor,
    group_size: int,
    input_global_scale: Tensor | None = None,
    bias: Tensor | None = None,
    divisor: bool = False,
) -> Tensor:
    """W4 fp4 GEMM; with `input_global_scale` activations are NVFP4-quantized too."""
    w = dequant_fp4(packed, block_scale, group_size)  # (N, K)
    xf = x.float()
    if input_global_scale is not None:
        xf = fake_quant_nvfp4_act(x, input_global_scale, divisor=divisor)
    return _finish(xf @ w.t(), bias, x.dtype)


# ---- MXFP8 (e4m3 codes with a power-of-two e8m0 scale per 1×32 block) ----


def dequant_mxfp8(weight: Tensor, weight_scale: Tensor, block: int = MX_BLOCK) -> Tensor:
    """(N, K) e4m3 codes with (N, K/block) uint8 e8m0 exponents → float32 (N, K)."""
    return weight.float() * e8m0_decode(weight_scale).repeat_interleave(block, dim=-1)


def fake_quant_mx_act(x: Tensor, block: int = MX_BLOCK) -> Tensor:
    """MXFP8 activations, quantized and back (float32): each row's `block` consecutive inputs share
    the scale 2^ceil(log2(amax / 448)) (amax / 448 rounded to float32 first, as ModelOpt's
    `compute_scale_e8m0_NV` does); codes are e4m3, round-to-nearest-even, saturating."""
    K = x.shape[-1]
    xg = x.float().reshape(-1, K // block, block)  # (M, K/32, 32)
    amax = xg.abs().amax(-1, keepdim=True)  # (M, K/32, 1)
    scale = e8m0_decode(e8m0_ceil(amax / FP8_MAX))
    q = _to_codes(xg / scale, torch.float8_e4m3fn)
    return (q.float() * scale).reshape(x.shape)


def mxfp8_gemm(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    block: int = MX_BLOCK,
    quantize_input: bool = True,
) -> Tensor:
    """MXFP8 W8A8: x (…, K) MX-quantized per 1×32 block @ dequant(W)^T (+ bias) → (…, N)."""
    w = dequant_mxfp8(weight, weight_scale, block)  # (N, K)
    xf = fake_quant_mx_act(x, block) if quantize_input else x.float()
    return _finish(xf @ w.t(), bias, x.dtype)


# ---- bitsandbytes ----


def dequant_bnb4(codes: Tensor, absmax: Tensor, table: Tensor, blocksize: int, shape) -> Tensor:
    """bnb 4-bit: flat bytes (high nibble first) with per-block absmax → float32 `shape`."""
    n = shape[0] * shape[1]
    w = nf4_like_decode(codes.reshape(-1), table)[:n]  # (N·K,)
    return (w * absmax.float().repeat_interleave(blocksize)[:n]).reshape(shape)


def llm_int8_gemm(
    x: Tensor, weight: Tensor, scb: Tensor, threshold: float, bias: Tensor | None = None
) -> Tensor:
    """bitsandbytes LLM.int8 as its CPU backend computes it: the input, cast to float16, has its
    outlier columns (an |x| ≥ threshold in any row) taken out and multiplied in x's dtype by the
    dequantized weight; the rest is row-wise absmax int8 × int8, rescaled by row · SCB / 127²."""
    K = x.shape[-1]
    xf = x.reshape(-1, K)
    a = xf.to(torch.float16)
    outliers = a.abs() >= threshold if threshold > 0 else torch.zeros_like(a, dtype=torch.bool)
    cols = outliers.any(0)  # (K,)
    a0 = a.masked_fill(outliers, 0)
    row = a0.abs().amax(1).float()  # (M,)
    q = torch.round(a0 * (127.0 / row[:, None])).to(torch.int8)
    if a.shape[0] > 1:
        q[:, cols] = 0
    acc = (q.float() @ weight.float().t()).to(torch.int32)  # exact: |sum| < 2^24
    out = (acc * (row[:, None] * scb.float()[None, :]) * 6.200124e-05).to(x.dtype)
    if bias is not None:
        out = out + bias
    if bool(cols.any()):
        sub_w = (weight[:, cols].float() * scb.float()[:, None] / 127.0).to(x.dtype)
        out = out.addmm(xf[:, cols], sub_w.t())
    return out.reshape(*x.shape[:-1], -1)


def dense_gemm(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (…, K) @ w (N, K)^T in float32, cast back."""
    return _finish(x.float() @ w.float().t(), bias, x.dtype)


# ---- fused elementwise ops (the decode path's Triton kernels) ----


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """RMSNorm in float32 (with the residual add first, returning the sum too)."""
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return out if residual is None else (out, residual)


def rotary(positions: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor):
    """Rotate-half rotary embedding; cos/sin tables (P, D/2)."""
    c = cos[positions].to(q.dtype).repeat(1, 2)[:, None, :]  # (T, 1, D)
    s = sin[positions].to(q.dtype).repeat(1, 2)[:, None, :]

    def rot(t: Tensor) -> Tensor:
        a, b = t.chunk(2, dim=-1)
        return t * c + torch.cat([-b, a], dim=-1) * s

    return rot(q), rot(k)


def silu_mul(x: Tensor) -> Tensor:
    """[gate | up] (…, 2I) → silu(gate) · up (…, I)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
