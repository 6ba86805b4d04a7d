"""Tiled tensor-core W4A16 GEMM over int4 weights in the `mma16` layout (`lowbit/kernels/mma16.py`),
for medium and large M (16..4096 rows of x).

Why: above the small-M kernel (`wna16_mma.py`, M ≤ 64) the `mma16` weight was dequantized whole
and handed to cuBLAS, which writes and reads the full 16-bit weight on every call. Here a program
owns one (BLOCK_M, BLOCK_N) output tile and walks K in BLOCK_K tiles; a K tile of the weight is
BLOCK_N/64 runs of BLOCK_K · 8 contiguous words (BLOCK_K/64 blocks of 64 × 64 codes each),
decoded in registers as `_dequant_mma16_kernel` does (nibbles → (n, k) by a reshape and a
permute) and fed to one MMA. Like `wna16_tiled.py`'s swap=1 it accumulates the transpose,
acc^T (BN, BM) += Wdq (BN, BK) @ x^T (BK, BM): on sm_90 the dequantized tile is wgmma's A
operand from registers, x its B operand from shared memory, and M the MMA's N (≥ 16 here,
tl.dot's minimum). Every load of the loop (words, scales, zeros, x) goes through cp.async and
Triton's `num_stages` pipeline. Shapes with few output tiles split K (`split`): the programs
write fp32 partials and the tile's last one sums them (`common.splitk_last`).

Where it runs: dispatch takes it only for wide weights (gate_up) at 33-64 rows, the one place the
H100 sweep found it faster (`_config`); the dequantized tile still passes through shared memory
on its way to the MMA, and above 64 rows dequantize + cuBLAS stays faster.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.triton.common import SplitKOutputs, grouped_tile, pdl, pdl_enter, splitk_last
from lowbit.kernels.triton.wna16_gemm import _magic
from lowbit.kernels.triton.wna16_mma import checked_mma16_rows

NUM_SMS = 132


def _config(M: int, N: int, K: int, G: int, **over) -> dict[str, int]:
    """Launch config: tile bm × bn × bk (bk divides G: a K tile reads one group's scales),
    warps, pipeline stages, group_m (row tiles that sweep N together, for L2 reuse of the
    weight tiles) and split (K splits; 0 = enough to fill the SMs once, at most 4, each with
    ≥ 8 K tiles).

    One warpgroup (4 warps) and bk = 128: the offline sm_90 builds whose wgmmas ptxas keeps
    asynchronous (8 warps, bk = 64 or split > 1 serialize them, C7515), without spills. Tiles:
    the fastest of the H100 sweep (benchmarks/RESULTS.md run 12, 10 configs on the four
    Llama-3-8B shapes) at each measured M, on every shape — M = 16: bm 16, bn 128, 4 stages;
    M = 64: bm 64, bn 128, 3 stages (gate_up 95 µs, where the small-M kernel takes 123 and bf16
    cuBLAS 93: the one place dispatch runs this kernel); M = 256: bm 128, bn 64, 3 stages
    (0.34-0.40× bf16, below dequantize + cuBLAS's 0.48-0.57×)."""
    bk = 128 if G % 128 == 0 else 64
    if M <= 32:
        bm = max(16, triton.next_power_of_2(M))
        c = {"bm": bm, "bn": 128, "bk": bk, "warps": 4, "stages": 4, "group_m": 8, "split": 0}
    elif M <= 64:
        c = {"bm": 64, "bn": 128, "bk": bk, "warps": 4, "stages": 3, "group_m": 8, "split": 0}
    else:
        c = {"bm": 128, "bn": 64, "bk": bk, "warps": 4, "stages": 3, "group_m": 8, "split": 0}
    if set(over) - set(c):
        raise ValueError(
            f"unknown wna16_mma_tiled config keys {sorted(set(over) - set(c))}; use {list(c)}"
        )
    c.update(over)
    if c["split"] == 0:  # fill the SMs once where the output tiles do not
        tiles = triton.cdiv(M, c["bm"]) * triton.cdiv(N, c["bn"])
        c["split"] = max(1, min(4, NUM_SMS // tiles, K // c["bk"] // 8))
    return c


@triton.jit
def _decode_tile(w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The int4 codes (BN, BK) int32 in (n, k) order of the words w (BN/64, BK·8) of one K tile:
    per 64-column group, BK/64 blocks of 512 words in the layout's order (s, g, c, j) with
    nibble i = h + 2 kh + 4 kl; n = 16 j + 8 h + g, k = 16 c + 4 s + 2 kh + kl in each block."""
    CGS: tl.constexpr = BLOCK_N // 64
    BLKS: tl.constexpr = BLOCK_K // 64
    w = w.reshape(CGS, BLKS, 4, 8, 4, 4)  # cg blk s g c j
    nib = tl.arange(0, 8) * 4
    q = (w[:, :, :, :, :, :, None] >> nib[None, None, None, None, None, None, :]) & 0xF
    q = q.reshape(CGS, BLKS, 4, 8, 4, 4, 2, 2, 2)  # cg blk s g c j kl kh h
    q = tl.permute(q, (0, 5, 8, 3, 1, 4, 2, 7, 6))  # cg j h g | blk c s kh kl
    return q.reshape(BLOCK_N, BLOCK_K)


@triton.jit
def _scales(s_ptr, row, pid_n, N, BLOCK_N: tl.constexpr):
    """The (BN,) scales of a tile's columns, read as int32 pairs: Triton's pipeliner puts a
    load through cp.async only when a thread reads ≥ 4 bytes, and one 16-bit scale a thread
    left this load (one each K tile) out of the prefetch."""
    rp = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    pairs = s_ptr.to(tl.pointer_type(tl.int32)) + row // 2 + rp
    w = tl.load(pairs, mask=rp < N // 2, other=0)  # (BN/2,)
    dt: tl.constexpr = s_ptr.dtype.element_ty
    lo = (w & 0xFFFF).to(tl.int16).to(dt, bitcast=True)
    hi = (w >> 16).to(tl.int16).to(dt, bitcast=True)
    return tl.join(lo, hi).reshape(BLOCK_N)  # column 2 i + h: half h of word i


@triton.jit
def _wna16_mma_tiled_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, y_ptr, cnt_ptr,
    M, N, K, ktiles_per_split,
    stride_xm, stride_sg, stride_zg, stride_os, stride_om, stride_ym,
    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, MAGIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT: tl.constexpr, FUSED: tl.constexpr, FINISH_BIAS: tl.constexpr, WARPS: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    tile = tl.program_id(0)
    pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    CGS: tl.constexpr = BLOCK_N // 64
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N  # N % 64 == 0: whole 64-column groups are in or out
    # a 64-column group's words are K/16 steps × 128 words = 8 K, a K tile's BK · 8 of them
    rc = pid_n * CGS + tl.arange(0, CGS)
    c_mask = rc < N // 64
    rw = tl.arange(0, BLOCK_K * 8)
    kt0 = pid_k * ktiles_per_split
    kt1 = tl.minimum(kt0 + ktiles_per_split, K // BLOCK_K)
    w_ptrs = qw_ptr + rc[:, None] * (K * 8) + kt0 * (BLOCK_K * 8) + rw[None, :]  # (BN/64, BK·8)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + kt0 * BLOCK_K + rk[None, :]  # (BM, BK)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # the transposed output tile
    for kt in range(kt0, kt1):  # BLOCK_K divides G divides K: no K masks
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)  # (BM, BK)
        q = _decode_tile(
            tl.load(w_ptrs, mask=c_mask[:, None], other=0), BLOCK_N, BLOCK_K
        )  # (BN, BK) codes
        g = (kt * BLOCK_K) // GROUP  # one group a K tile
        scale = _scales(s_ptr, g * stride_sg, pid_n, N, BLOCK_N)  # (BN,)
        if HAS_ZERO:
            zw = tl.load(z_ptr + g * stride_zg + rn // 8, mask=n_mask, other=0)
            zero = (zw >> ((rn % 8) * 4)) & 0xF
        else:
            zero = tl.full([BLOCK_N], 8, tl.int32)
        # code → float by OR-ing it into the mantissa of MAGIC (`wna16_gemm._magic`): the
        # difference of two such floats is q − zero exactly; one rounding at the scale
        wq = (q | MAGIC).to(tl.int16).to(x.dtype, bitcast=True)
        zq = (zero | MAGIC).to(tl.int16).to(x.dtype, bitcast=True)
        wd = (wq - zq[:, None]) * scale[:, None]  # (BN, BK)
        acc = tl.dot(wd, tl.trans(x), acc)  # (BN, BM)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * 8
    out = tl.trans(acc)  # (BM, BN)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    ptrs = out_ptr + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    if FUSED:  # the tile's last split sums the partials into y
        splitk_last(out_ptr, y_ptr, bias_ptr, cnt_ptr, tile, M, N, pid_m * BLOCK_M,
                    pid_n * BLOCK_N, stride_os, stride_om, stride_ym, SPLIT, BLOCK_M, BLOCK_N,
                    FINISH_BIAS, WARPS)  # fmt: skip


def wna16_mma_tiled(
    x: Tensor,
    qmma: Tensor,
    scales: Tensor,
    qzeros: Tensor | None,
    group_size: int,
    bias: Tensor | None = None,
    perm: Tensor | None = None,
    config: dict | None = None,
) -> Tensor:
    """y = x @ dequant(W)^T (+ bias) for any number of rows of bf16/fp16 x and an int4 weight in
    the `mma16` layout (`pack_mma16`); arguments as `wna16_mma.wna16_mma_gemm`. `config`
    overrides `_config` (bm, bn, bk, warps, stages, group_m, split) for tuning."""
    x2, N, K, G = checked_mma16_rows(x, qmma, scales, qzeros, group_size, bias, perm)
    assert scales.data_ptr() % 4 == 0 and (K == G or scales.stride(0) % 2 == 0), (
        "scales are read as int32 pairs: rows must start 4-byte aligned"
    )
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    cfg = _config(M, N, K, G, **(config or {}))
    bm, bn, bk = cfg["bm"], cfg["bn"], cfg["bk"]
    assert bn % 64 == 0 and bk % 64 == 0 and G % bk == 0, (
        f"tile bn={bn}, bk={bk}: multiples of 64, bk dividing G={G}"
    )
    assert bm >= 16 and bm & (bm - 1) == 0, f"bm={bm}: a power of two ≥ 16 (tl.dot)"
    ktiles = K // bk
    per = triton.cdiv(ktiles, cfg["split"])
    split = triton.cdiv(ktiles, per)  # no empty split
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    o = SplitKOutputs(split, M, N, x.dtype, x.device, tiles)
    dummy = qmma  # never read when the flag that needs it is off
    _wna16_mma_tiled_kernel[(tiles, split)](
        x2, qmma, scales, qzeros if qzeros is not None else dummy,
        bias if bias is not None else dummy, o.part, o.out, o.counters,
        M, N, K, per,
        x2.stride(0), scales.stride(0), qzeros.stride(0) if qzeros is not None else 0,
        o.part.stride(0), o.part.stride(1), o.out.stride(0),
        GROUP=G, HAS_ZERO=qzeros is not None, HAS_BIAS=bias is not None and split == 1,
        MAGIC=_magic(x.dtype, 4), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["group_m"],
        SPLIT=split, FUSED=o.fused, FINISH_BIAS=bias is not None, WARPS=cfg["warps"],
        **pdl(x.device), num_warps=cfg["warps"], num_stages=cfg["stages"],
    )  # fmt: skip
    return o.result(bias).reshape(*x.shape[:-1], N)
