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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

NUM_SMS = 132


def _config(M: int, N: int, K: int, group: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) by problem size."""
    bk = min(128, group)
    if M <= 16:
        bm, bn, warps, stages = 16, 64, 4, 4
    elif M <= 64:
        bm, bn, warps, stages = 64, 64, 4, 4
    else:
        bm, bn, warps, stages = 128, 128, 8, 3
        bk = min(64, group)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    k_iters = triton.cdiv(K, bk)
    split = 1
    while tiles * split < 2 * NUM_SMS and k_iters // (split * 2) >= 4 and M <= 64:
        split *= 2
    return bm, bn, bk, split, warps, stages


@triton.jit
def _wna16_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_os, stride_om,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rnp = pid_n * (BLOCK_N // PACK) + tl.arange(0, BLOCK_N // PACK)  # packed columns
    shifts = (tl.arange(0, BLOCK_N) % PACK) * BITS
    m_mask = rm < M
    n_mask = rn < N
    np_mask = rnp < tl.cdiv(N, PACK)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
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
            qw_ptr + rk[:, None] * stride_qk + rnp[None, :],
            mask=k_mask[:, None] & np_mask[None, :],
            other=0,
        )  # (BK, BN / PACK) int32
        # Repeat each word PACK times along N, then shift out each column's bits.
        w = tl.interleave(w, w)
        w = tl.interleave(w, w)
        if PACK == 8:
            w = tl.interleave(w, w)
        q = (w >> shifts[None, :]) & MASK  # (BK, BN)
        g = (kt * BLOCK_K) // GROUP  # BLOCK_K divides GROUP: one group per tile
        scale = tl.load(s_ptr + g * stride_sg + rn, mask=n_mask, other=0.0)  # (BN,)
        if HAS_ZERO:
            zw = tl.load(z_ptr + g * stride_zg + rnp, mask=np_mask, other=0)
            zw = tl.interleave(zw, zw)
            zw = tl.interleave(zw, zw)
            if PACK == 8:
                zw = tl.interleave(zw, zw)
            zero = (zw >> shifts) & MASK
        else:
            zero = tl.full([BLOCK_N], 1 << (BITS - 1), tl.int32)
        wd = ((q - zero[None, :]).to(tl.float32) * scale[None, :].to(tl.float32)).to(x.dtype)
        acc += tl.dot(x, wd)
    out = out_ptr + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


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
    perm     (K,)             int64 or None: act-order, x columns are read as x[..., perm]
    returns  (..., N)         x.dtype
    """
    assert bits in (4, 8), f"bits={bits}; this kernel handles 4 and 8"
    P = 32 // bits
    K = x.shape[-1]
    N = qweight.shape[1] * P
    G = K if group_size in (-1, 0) else group_size
    assert qweight.shape == (K, N // P) and qweight.dtype == torch.int32, qweight.shape
    assert K % G == 0 and scales.shape == (K // G, N), (scales.shape, K, N, G)
    assert qzeros is None or qzeros.shape == (K // G, N // P), qzeros.shape
    assert G % 16 == 0, f"group size {G} must be a multiple of 16"
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if perm is not None:
        assert perm.shape == (K,), perm.shape
        x2 = x2[:, perm]
    x2 = x2.contiguous()
    M = x2.shape[0]
    bm, bn, bk, split, warps, stages = _config(M, N, K, G)
    bk = min(bk, G & -G)  # a power of two dividing G: each K tile sits in one group
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
        GROUP=G, BITS=bits, HAS_ZERO=qzeros is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    y = out[0] if split == 1 else out.sum(0).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, N)
