"""Weight-only int4/int8 group-wise GEMM (W4A16, W8A16): y = x @ dequant(W)^T, bf16/fp16 MMA.

Weight layout this kernel reads (packed along N, sequential nibbles — AWQ's packing direction
without AWQ's nibble interleave; GPTQ and compressed-tensors repack into it at load):

  qweight  (K, N // P)  int32, P = 32 // bits values per word; value of (k, n) is
                        (qweight[k, n // P] >> (bits · (n % P))) & (2^bits - 1), unsigned
  scales   (K // G, N)  activation dtype
  qzeros   (K // G, N // P) int32 packed like qweight, or None for symmetric (zero = 2^(bits-1))
  W[n, k] = (q(k, n) - zero(k // G, n)) · scale(k // G, n)

Act-order (GPTQ desc_act) checkpoints are handled outside: the scheme sorts K by g_idx once at
load and passes `perm`, so groups here are always contiguous runs of G along K.
Small M splits K across programs (partial sums reduced in fp32) so a batch-1 GEMV fills the GPU.
The group scale multiplies each K tile's partial product, not every weight.
The conventional tiled GEMM over the same layout is `wna16_tiled.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.triton.common import pdl, pdl_enter

NUM_SMS = 132
# Above this M the GEMM is compute-bound: dequantize once, then cuBLAS (the fused kernel's
# batched mma is far from the bf16 peak).
DEQUANT_MIN_M = 64


def _config(M: int, N: int, K: int, group: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) by problem size."""
    bk = min(128, group & -group)  # a power of two dividing G: each K tile sits in one group
    if M <= 16:
        bm, bn, warps, stages = 16, 128, 4, 4
    elif M <= 64:
        bm, bn, warps, stages = 64, 128, 4, 3
    else:  # only reached when a caller lowers DEQUANT_MIN_M
        bm, bn, warps, stages = 64, 128, 8, 3
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    k_iters = triton.cdiv(K, bk)
    split = 1
    while tiles * split < 2 * NUM_SMS and k_iters // (split * 2) >= 4 and M <= 64:
        split *= 2
    return bm, bn, bk, split, warps, stages


def _magic(dtype: torch.dtype, bits: int) -> int:
    """Bit pattern of a float whose ulp is 1 over the code range (0 = convert normally)."""
    if dtype == torch.float16:
        return 0x6400  # 1024.0: 10 mantissa bits hold 4- and 8-bit codes
    if dtype == torch.bfloat16 and bits == 4:
        return 0x4300  # 128.0: 7 mantissa bits hold 4-bit codes only
    return 0


@triton.jit
def _wna16_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_os, stride_om,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, MAGIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    # Each packed word holds P columns n = P·j + i. Rather than shuffling the nibbles apart, the
    # tile is unpacked into P slices (slice i = columns P·j + i) and multiplied as a batch of P
    # (BK, BN/P) matrices: one shift and mask per value, no data movement between lanes.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    P: tl.constexpr = 32 // BITS
    BNP: tl.constexpr = BLOCK_N // P
    MASK: tl.constexpr = (1 << BITS) - 1
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = pid_n * BNP + tl.arange(0, BNP)  # packed column index
    ri = tl.arange(0, P)
    shifts = (ri * BITS)[:, None, None]  # (P, 1, 1)
    cols = rj[None, :] * P + ri[:, None]  # (P, BNP) output column of slice i, word j
    m_mask = rm < M
    j_mask = rj < N // P
    acc = tl.zeros([P, BLOCK_M, BNP], tl.float32)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    for kt in range(pid_k * per_split, tl.minimum((pid_k + 1) * per_split, k_tiles)):
        rk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )  # (BM, BK)
        w = tl.load(
            qw_ptr + rk[:, None] * stride_qk + rj[None, :],
            mask=k_mask[:, None] & j_mask[None, :],
            other=0,
        )  # (BK, BNP) int32
        q = (w[None, :, :] >> shifts) & MASK  # (P, BK, BNP)
        g = (kt * BLOCK_K) // GROUP  # BLOCK_K divides GROUP: one group per tile
        if HAS_ZERO:
            zw = tl.load(z_ptr + g * stride_zg + rj, mask=j_mask, other=0)  # (BNP,)
            zero = (zw[None, :] >> (ri * BITS)[:, None]) & MASK  # (P, BNP)
        else:
            zero = tl.full([P, BNP], 1 << (BITS - 1), tl.int32)
        if MAGIC != 0:
            # Integer → float without a conversion instruction: OR the code into the mantissa
            # of MAGIC (bf16 128.0 / fp16 1024.0, whose ulp is 1) and subtract MAGIC + zero.
            wq = (q | MAGIC).to(tl.int16).to(x.dtype, bitcast=True)
            zq = (zero | MAGIC).to(tl.int16).to(x.dtype, bitcast=True)
            wq = wq - zq[:, None, :]  # small integers, exact
        else:
            wq = (q - zero[:, None, :]).to(x.dtype)
        xb = tl.broadcast_to(x[None, :, :], (P, BLOCK_M, BLOCK_K))
        scale = tl.load(s_ptr + g * stride_sg + cols, mask=j_mask[None, :], other=0.0)  # (P, BNP)
        acc += tl.dot(xb, wq) * scale.to(tl.float32)[:, None, :]
    out = out_ptr + pid_k * stride_os + rm[None, :, None] * stride_om + cols[:, None, :]
    mask = m_mask[None, :, None] & j_mask[None, None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wna16_dequant_kernel(
    qw_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_qk, stride_sg, stride_zg, stride_ok,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    # Large M is compute-bound: dequantize W^T once to (K, N) and let cuBLAS do the GEMM.
    P: tl.constexpr = 32 // BITS
    BNP: tl.constexpr = BLOCK_N // P
    MASK: tl.constexpr = (1 << BITS) - 1
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rj = tl.program_id(1) * BNP + tl.arange(0, BNP)
    ri = tl.arange(0, P)
    cols = rj[None, :] * P + ri[:, None]  # (P, BNP)
    k_mask = rk < K
    j_mask = rj < N // P
    w = tl.load(qw_ptr + rk[:, None] * stride_qk + rj[None, :],
                mask=k_mask[:, None] & j_mask[None, :], other=0)  # fmt: skip
    q = (w[None, :, :] >> (ri * BITS)[:, None, None]) & MASK  # (P, BK, BNP)
    g = rk // GROUP  # (BK,)
    gm = k_mask[None, :, None] & j_mask[None, None, :]
    if HAS_ZERO:
        zw = tl.load(z_ptr + g[:, None] * stride_zg + rj[None, :],
                     mask=k_mask[:, None] & j_mask[None, :], other=0)  # fmt: skip
        zero = (zw[None, :, :] >> (ri * BITS)[:, None, None]) & MASK
    else:
        zero = 1 << (BITS - 1)
    scale = tl.load(s_ptr + g[None, :, None] * stride_sg + cols[:, None, :], mask=gm, other=0.0)
    wd = (q - zero).to(tl.float32) * scale.to(tl.float32)
    tl.store(out_ptr + rk[None, :, None] * stride_ok + cols[:, None, :],
             wd.to(out_ptr.dtype.element_ty), mask=gm)  # fmt: skip


def checked_rows(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    qzeros: Tensor | None,
    group_size: int,
    bits: int,
    bias: Tensor | None,
    perm: Tensor | None,
) -> tuple[Tensor, tuple[int, ...], int, int]:
    """Assert the canonical layout's shapes; x as contiguous rows (M, K) in act order.

    Returns (x2, x's leading shape, N, G). Shared by this kernel and `wna16_gemv`.
    """
    assert bits in (4, 8), f"bits={bits}; these kernels handle 4 and 8"
    P = 32 // bits
    K = x.shape[-1]
    N = qweight.shape[1] * P
    G = K if group_size in (-1, 0) else group_size
    assert qweight.shape == (K, N // P) and qweight.dtype == torch.int32, qweight.shape
    assert qweight.stride(1) == 1, qweight.stride()
    assert K % G == 0 and scales.shape == (K // G, N), (scales.shape, K, N, G)
    assert scales.stride(1) == 1, scales.stride()
    assert qzeros is None or (qzeros.shape == (K // G, N // P) and qzeros.stride(1) == 1)
    assert bias is None or bias.shape == (N,), bias.shape
    assert G % 16 == 0, f"group size {G} must be a multiple of 16"
    x2 = x.reshape(-1, K)
    if perm is not None:
        assert perm.shape == (K,), perm.shape
        x2 = x2[:, perm]
    return x2.contiguous(), x.shape[:-1], N, G


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
    """x @ dequant(W)^T (+ bias) for a packed int4/int8 group-wise weight.

    x        (..., K)         bf16 / fp16
    qweight  (K, N // P)      int32, P = 32 // bits
    scales   (K // G, N)      x.dtype
    qzeros   (K // G, N // P) int32 or None (symmetric)
    bias     (N,) or None
    perm     (K,)             int64 or None: act-order, x columns are read as x[..., perm]
    returns  (..., N)         x.dtype
    """
    x2, lead, N, G = checked_rows(x, qweight, scales, qzeros, group_size, bits, bias, perm)
    M, K = x2.shape
    if M > DEQUANT_MIN_M:
        wt = torch.empty(K, N, dtype=x.dtype, device=x.device)
        _wna16_dequant_kernel[(triton.cdiv(K, 32), triton.cdiv(N, 128))](
            qweight, scales, qzeros if qzeros is not None else qweight, wt, N, K,
            qweight.stride(0), scales.stride(0), qzeros.stride(0) if qzeros is not None else 0,
            wt.stride(0), GROUP=G, BITS=bits, HAS_ZERO=qzeros is not None,
            BLOCK_N=128, BLOCK_K=32, **pdl(wt.device), num_warps=4,
        )  # fmt: skip
        y = x2 @ wt
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, N)
    bm, bn, bk, split, warps, stages = _config(M, N, K, G)
    if split == 1:
        out = torch.empty(1, M, N, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split)
    _wna16_gemm_kernel[grid](
        x2, qweight, scales, qzeros if qzeros is not None else qweight, out,
        M, N, K,
        x2.stride(0), qweight.stride(0), scales.stride(0),
        qzeros.stride(0) if qzeros is not None else 0, out.stride(0), out.stride(1),
        GROUP=G, BITS=bits, HAS_ZERO=qzeros is not None, MAGIC=_magic(x.dtype, bits),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
        **pdl(out.device), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    y = out[0] if split == 1 else out.sum(0).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, N)
