"""W4A16 / W8A16 tiled GEMM with the weights dequantized in registers: the large-M path for
weights with many output tiles.

Same canonical layout as `wna16_gemm.py` (qweight (K, N/P) int32 packed along N, scales
(K/G, N), qzeros or None, perm for act-order). A program owns one (BLOCK_M, BLOCK_N) output
tile and walks K; each packed (BK, BN/P) tile is unpacked in registers to (BK, BN) in natural
column order and feeds one MMA. Dispatch uses it where it measured faster than the alternatives
(dispatch.WNA16_TILED_*); elsewhere it is a tuning probe of benchmarks/bench_gemm.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.triton.common import grouped_tile, pdl, pdl_enter
from lowbit.kernels.triton.wna16_gemm import _magic, checked_rows


def _tiled_config(M: int, N: int, K: int, G: int) -> dict[str, int]:
    """Default launch config of `wna16_gemm_tiled`: bm, bn, bk, warps, stages, group_m, swap.

    swap=1 computes the transposed product (see `_wna16_tiled_kernel`); compiled for sm_90 it
    keeps the MMA asynchronous and feeds the dequantized tile from registers, where swap=0
    stores it to shared memory 16 bits at a time and waits for each MMA.
    """
    bk = min(64, G & -G)  # a power of two dividing G: each K tile sits in one group
    if M >= 64:  # the Triton matmul tutorial's Hopper fp16 tile, with N halved for the dequant
        return {"bm": 128, "bn": 128, "bk": bk, "warps": 8, "stages": 3, "group_m": 8, "swap": 1}
    bm = max(16, triton.next_power_of_2(M))
    return {"bm": bm, "bn": 128, "bk": bk, "warps": 4, "stages": 4, "group_m": 8, "swap": 1}


@triton.jit
def _wna16_tiled_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_om,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    MAGIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    # One (BM, BN) output tile a program. Each K tile's packed words (BK, BN/P) are unpacked
    # to (BK, BN/P, P) and flattened, which puts code i of word j at column P·j + i: the natural
    # column order, so the group's scales and zeros are contiguous (BN,) rows and the whole
    # dequantized tile feeds one MMA. SWAP accumulates the transpose, acc^T (BN, BM) += W^T x^T:
    # on Hopper the dequantized tile is then wgmma's A operand, which may come from registers
    # (B must be in shared memory), and a small M becomes the MMA's N, which can be as small as 8.
    P: tl.constexpr = 32 // BITS
    BNP: tl.constexpr = BLOCK_N // P
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = pid_n * BNP + tl.arange(0, BNP)  # packed column index
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    j_mask = rj < N // P  # N % P == 0: word j is in range iff all its P columns are
    shifts = tl.arange(0, P) * BITS
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]  # (BM, BK)
    w_ptrs = qw_ptr + rk[:, None] * stride_qk + rj[None, :]  # (BK, BNP)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kt in range(0, K // BLOCK_K):  # BLOCK_K divides G divides K: no K masks
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)  # (BM, BK)
        w = tl.load(w_ptrs, mask=j_mask[None, :], other=0)  # (BK, BNP) int32
        q = (w[:, :, None] >> shifts[None, None, :]) & MASK  # (BK, BNP, P)
        q = tl.reshape(q, (BLOCK_K, BLOCK_N))  # column P·j + i = n
        g = (kt * BLOCK_K) // GROUP  # one group per K tile
        scale = tl.load(s_ptr + g * stride_sg + rn, mask=n_mask, other=0.0).to(x.dtype)  # (BN,)
        if HAS_ZERO:
            zw = tl.load(z_ptr + g * stride_zg + rn // P, mask=n_mask, other=0)  # (BN,)
            zero = (zw >> ((rn % P) * BITS)) & MASK
        else:
            zero = tl.full([BLOCK_N], 1 << (BITS - 1), tl.int32)
        if MAGIC != 0:
            # Integer → float by OR-ing the code into the mantissa of MAGIC (see
            # _wna16_gemm_kernel); the difference of two such floats is the exact q − zero.
            wq = (q | MAGIC).to(tl.int16).to(x.dtype, bitcast=True)
            zq = (zero | MAGIC).to(tl.int16).to(x.dtype, bitcast=True)
            wd = (wq - zq[None, :]) * scale[None, :]  # (BK, BN)
        else:
            wd = (q - zero[None, :]).to(x.dtype) * scale[None, :]
        if SWAP:
            acc = tl.dot(tl.trans(wd), tl.trans(x), acc)  # (BN, BM)
        else:
            acc = tl.dot(x, wd, acc)  # (BM, BN)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_qk
    if SWAP:
        acc = tl.trans(acc)  # (BM, BN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def wna16_gemm_tiled(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    qzeros: Tensor | None,
    group_size: int,
    bits: int = 4,
    bias: Tensor | None = None,
    perm: Tensor | None = None,
    config: dict | None = None,
) -> Tensor:
    """`wna16_gemm` (same arguments and layout) through the tiled dequantize-in-registers
    kernel; `config` overrides `_tiled_config` (bm, bn, bk, warps, stages, group_m, swap; bk
    must divide G)."""
    x2, lead, N, G = checked_rows(x, qweight, scales, qzeros, group_size, bits, bias, perm)
    M, K = x2.shape
    P = 32 // bits
    cfg = _tiled_config(M, N, K, G)
    unknown = set(config or {}) - set(cfg)
    assert not unknown, f"unknown config keys {sorted(unknown)}; known: {sorted(cfg)}"
    cfg.update(config or {})
    bm, bn, bk = cfg["bm"], cfg["bn"], cfg["bk"]
    assert G % bk == 0, f"bk={bk} must divide the group size {G} (a K tile reads one group)"
    assert min(bm, bn, bk) >= 16 and bn % P == 0, (
        f"tile {bm}x{bn}x{bk}: each ≥ 16 (tl.dot), bn % {P} == 0"
    )
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*lead, N)
    dummy = qweight  # never read when the flag that needs it is off
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _wna16_tiled_kernel[grid](
        x2, qweight, scales, qzeros if qzeros is not None else dummy,
        bias if bias is not None else dummy, out,
        M, N, K,
        x2.stride(0), qweight.stride(0), scales.stride(0),
        qzeros.stride(0) if qzeros is not None else 0, out.stride(0),
        GROUP=G, BITS=bits, HAS_ZERO=qzeros is not None, HAS_BIAS=bias is not None,
        MAGIC=_magic(x.dtype, bits), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["group_m"],
        SWAP=bool(cfg["swap"]), **pdl(out.device), num_warps=cfg["warps"], num_stages=cfg["stages"],
    )  # fmt: skip
    return out.reshape(*lead, N)
