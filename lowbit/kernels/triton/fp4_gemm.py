"""Weight-only FP4 (NVFP4 / MXFP4) GEMM for GPUs without FP4 tensor cores (Hopper): the e2m1
codes are decoded in registers and multiplied in bf16/fp16 (MMA) or fp32 (CUDA cores).

y = x @ dequant(W)^T (+ bias), dequant(W)[n, k] = e2m1(code[n, k]) · bs[n, k // G] · rs[n], with
the layout of `lowbit/quant/schemes/fp4.py`: `weight` (N, K/2) uint8, low nibble = even k (read
here as int32 words, nibble i of word j = k 8j + i); `block_scale` (N, K/G) as stored, fp8 e4m3
(NVFP4, G = 16) or uint8 e8m0 2^(e − 127) (MXFP4, G = 32); `row_scale` (N,) float32 (NVFP4).
Codes and scales are decoded from their bits: each value is built in the low exponent and top
mantissa bits of an fp32 (a subnormal where the small float's is) and multiplied by the power of
two between the two biases, which is exact; e4m3 0x7F / e8m0 0xFF decode to NaN as in torch.

Two paths, chosen by M (`config={"path": ...}` forces one):
  * "gemv" (M ≤ GEMV_MAX_M): split-K on the CUDA cores. A program owns BLOCK_N weight rows and a
    K range; each thread reads 16 contiguous bytes of a row per step and keeps an fp32
    (M, BLOCK_N, BLOCK_K) accumulator, reduced across lanes once at the end. Splits write fp32
    partials that the last program of a row block sums (+ bias), as in w8a8_gemv.py.
  * "mma" (larger M): one (BLOCK_M, BLOCK_N) output tile a program; each (BLOCK_N, BLOCK_K)
    weight tile is decoded and block-scaled per weight to x's dtype in registers and feeds one
    tl.dot with fp32 accumulation. e2m1 × e4m3 has ≤ 6 significant bits and fits bf16 and fp16
    exactly, so the dequantized operand carries no rounding; the row scale is applied to the
    fp32 accumulator. MXFP4 in fp16 is exact only for block scales 2^-23 … 2^13 (fp16's range;
    bf16 has fp32's).
Weight-only: NVFP4 W4A4 checkpoints (`input_scale` given) first pass x through the reference's
own activation simulation (`reference.fake_quant_nvfp4_act`, float32), then run the same kernel
(the GEMV reads that float32 x as is; the MMA path rounds it to x.dtype for the tensor cores).
Both calls are CUDA-graph safe (the routine's e2m1 tables are cached per device). NVFP4 and
MXFP4 linears reach this through `dispatch.fp4_gemm` on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels import reference
from lowbit.kernels.triton.common import (
    SplitKOutputs,
    grouped_tile,
    pdl,
    pdl_enter,
    splitk_last,
)

NUM_SMS = 132
GEMV_MAX_M = 2  # every row of x is a register accumulator of BLOCK_N × BLOCK_K

_NAN_BITS = tl.constexpr(0x7FC00000)
_SIGN_BIT = tl.constexpr(-(2**31))  # 0x80000000 as an int32
_E2M1_BIAS = tl.constexpr(2.0**126)  # e2m1 bias 1 vs fp32 bias 127
_E4M3_BIAS = tl.constexpr(2.0**120)  # e4m3 bias 7 vs fp32 bias 127


def _gemv_config(M: int, N: int, K: int, **over) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, per_split tiles, num_warps, num_stages) of the GEMV.

    BLOCK_K counts k values (BLOCK_K / 2 bytes a row: 16 bytes a thread at the defaults). Splits
    aim at `waves` programs an SM in whole BLOCK_K tiles; `split` > 0 sets their number instead.
    """
    c = {"bn": 16, "bk": 256, "warps": 4, "stages": 1, "waves": 4, "split": 0}
    if set(over) - set(c):
        raise ValueError(
            f"unknown fp4 GEMV config keys {sorted(set(over) - set(c))}; use {list(c)}"
        )
    c.update(over)
    bk = min(c["bk"], max(16, triton.next_power_of_2(K)))
    assert bk >= 16 and bk & (bk - 1) == 0, f"bk={bk}: a power of two ≥ 16"
    tiles = triton.cdiv(K, bk)
    want = c["split"] or max(1, (c["waves"] * NUM_SMS) // triton.cdiv(N, c["bn"]))
    per_split = max(1, triton.cdiv(tiles, want))
    return c["bn"], bk, per_split, c["warps"], c["stages"]


def _mma_config(M: int, N: int, K: int, G: int) -> dict[str, int]:
    """Default launch config of the MMA path: bm, bn, bk, warps, stages, group_m, swap, split.

    The tiles of `wna16_tiled._tiled_config` (swap=1: the decoded tile is wgmma's register A
    operand); bk is a multiple of G so a K tile holds whole scale groups. `split` > 1 splits K
    over that many programs a tile (fp32 partials, summed by the tile's last split): for small
    M, where the tiles alone leave most SMs idle (e.g. M = 64, N = 4096: 32 tiles on 132 SMs).
    4 splits below 64 rows, and at 64 rows where the tiles fill less than the SMs: H100, run 10
    of benchmarks/RESULTS.md (µs, 1 → 4 splits): M = 16 qkv 73 → 32, o 76 → 21, gate_up
    120 → 93, down 278 → 60; M = 64 qkv 113 → 62, o 113 → 39, down 387 → 106, gate_up (224
    tiles) 186 → 191, so 1 there.
    """
    bk = max(64, G)
    if M >= 64:
        tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
        return {"bm": 128, "bn": 128, "bk": bk, "warps": 8, "stages": 3, "group_m": 8, "swap": 1,
                "split": 4 if M <= 64 and tiles < NUM_SMS else 1}  # fmt: skip
    bm = max(16, triton.next_power_of_2(M))
    return {"bm": bm, "bn": 128, "bk": bk, "warps": 4, "stages": 4, "group_m": 8, "swap": 1,
            "split": 4}  # fmt: skip


@triton.jit
def _e2m1_f32(w, sh):
    """Nibble at bits 28 − sh … 31 − sh of int32 words → fp32 (sign bit 3, 2 exponent bits,
    1 mantissa bit; subnormal when the exponent is 0)."""
    t = w << sh  # the nibble in bits 28-31
    # arithmetic shift: the sign stays at bit 31, exponent and mantissa land on bits 23-24, 22
    bits = (t >> 6) & (_SIGN_BIT | 0x01C00000)
    return bits.to(tl.float32, bitcast=True) * _E2M1_BIAS


@triton.jit
def _code_dot(w, x, i: tl.constexpr):
    """(BM, BN, BKW) x[m, j] · e2m1 code i of words w[n, j]."""
    return _e2m1_f32(w, 28 - 4 * i)[None, :, :] * x[:, None, :]


@triton.jit
def _scale_f32(b, MX: tl.constexpr):
    """Block-scale bytes (int32 0-255) → fp32: e8m0 2^(b − 127) if MX, else fp8 e4m3."""
    if MX:
        bits = tl.where(b == 0, 0x00400000, b << 23)  # 2^-127 is subnormal
        return tl.where(b == 255, _NAN_BITS, bits).to(tl.float32, bitcast=True)
    else:
        bits = ((b & 0x7F) << 20) | ((b & 0x80) << 24)
        bits = tl.where((b & 0x7F) == 0x7F, _NAN_BITS, bits)
        return bits.to(tl.float32, bitcast=True) * _E4M3_BIAS


@triton.jit
def _dequant_tile(w_ptr, s_ptr, rn, kw, n_mask, stride_wn, stride_sn, KW, GROUP: tl.constexpr,
                  MX: tl.constexpr, MASK: tl.constexpr, EVICT: tl.constexpr):  # fmt: skip
    """(BN, 8·BKW) fp32 e2m1 · block scale of rows rn and words kw, in natural k order.

    EVICT is the weight loads' eviction policy: "evict_first" where each byte is read once
    (GEMV), "" where other row tiles of x read the tile again from L2 (MMA)."""
    WPG: tl.constexpr = GROUP // 8  # int32 words a scale group
    w_ptrs = w_ptr + rn[:, None] * stride_wn + kw[None, :]  # (BN, BKW) int32, 8 codes each
    s_ptrs = s_ptr + rn[:, None] * stride_sn + kw[None, :] // WPG  # (BN, BKW) scale bytes
    if MASK:  # masked words read as code 0 (= 0.0) with scale byte 0 (finite)
        mask = n_mask[:, None] & (kw < KW)[None, :]
        w = tl.load(w_ptrs, mask=mask, other=0, eviction_policy=EVICT)
        b = tl.load(s_ptrs, mask=mask, other=0)
    else:
        w = tl.load(w_ptrs, eviction_policy=EVICT)
        b = tl.load(s_ptrs)
    sc = _scale_f32(b.to(tl.int32), MX)  # (BN, BKW)
    # code i of every word, scaled, as (BN, BKW) tiles; joined so that the 8 values of a word
    # lie in one thread in k order (join adds a last axis: pairs differ in i's top bit first),
    # which the reshape to (BN, 8·BKW) keeps without moving data
    j0 = tl.join(_e2m1_f32(w, 28) * sc, _e2m1_f32(w, 12) * sc)  # codes 0, 4
    j1 = tl.join(_e2m1_f32(w, 24) * sc, _e2m1_f32(w, 8) * sc)  # 1, 5
    j2 = tl.join(_e2m1_f32(w, 20) * sc, _e2m1_f32(w, 4) * sc)  # 2, 6
    j3 = tl.join(_e2m1_f32(w, 16) * sc, _e2m1_f32(w, 0) * sc)  # 3, 7
    v = tl.join(tl.join(j0, j2), tl.join(j1, j3))  # [p, q, r] = code 4p + 2q + r
    return tl.reshape(v, (w.shape[0], w.shape[1] * 8))  # column 8j + i = k


@triton.jit
def _fp4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, rs_ptr, b_ptr, out_ptr, y_ptr, cnt_ptr, M, N, KW,
    stride_xm, stride_wn, stride_sn, stride_os, stride_om, stride_ym,
    GROUP: tl.constexpr, MX: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PER_SPLIT: tl.constexpr, EVEN: tl.constexpr, STAGES: tl.constexpr,
    SPLIT: tl.constexpr, FUSED: tl.constexpr, FINISH_BIAS: tl.constexpr, WARPS: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    BKW: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N, BKW], tl.float32)
    kw0 = pid_k * PER_SPLIT * BKW
    WPG: tl.constexpr = GROUP // 8  # int32 words a scale group
    # constant trip count; the loop's num_stages prefetches its loads (there is no tl.dot)
    for t in tl.range(PER_SPLIT, num_stages=STAGES):
        kw = kw0 + t * BKW + tl.arange(0, BKW)  # (BKW,) word index
        w_ptrs = w_ptr + rn[:, None] * stride_wn + kw[None, :]  # (BN, BKW) int32, 8 codes each
        s_ptrs = s_ptr + rn[:, None] * stride_sn + kw[None, :] // WPG  # (BN, BKW) scale bytes
        # x as (BM, BKW, 8): the 8 k of word j at 8j + i
        x_ptrs = x_ptr + rm[:, None, None] * stride_xm + (kw[:, None] * 8 + tl.arange(0, 8))[None]
        if EVEN:  # N % BLOCK_N == 0 and the splits tile K exactly
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            b = tl.load(s_ptrs)
            x = tl.load(x_ptrs, mask=m_mask[:, None, None], other=0.0)
        else:  # masked words read as code 0 (= 0.0) with scale byte 0 (finite)
            mask = n_mask[:, None] & (kw < KW)[None, :]
            w = tl.load(w_ptrs, mask=mask, other=0, eviction_policy="evict_first")
            b = tl.load(s_ptrs, mask=mask, other=0)
            x = tl.load(x_ptrs, mask=m_mask[:, None, None] & (kw < KW)[None, :, None], other=0.0)
        # x of code i of every word, (BM, BKW) each: the in-thread 8 split three times
        xa, xb = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_M, BKW, 4, 2)))  # i even / odd
        xa0, xa1 = tl.split(tl.reshape(xa, (BLOCK_M, BKW, 2, 2)))  # i in {0, 4} / {2, 6}
        xb0, xb1 = tl.split(tl.reshape(xb, (BLOCK_M, BKW, 2, 2)))  # i in {1, 5} / {3, 7}
        x0, x4 = tl.split(xa0)
        x2, x6 = tl.split(xa1)
        x1, x5 = tl.split(xb0)
        x3, x7 = tl.split(xb1)
        # Σ over a word's 8 codes first, then its block scale once a word
        part = _code_dot(w, x0, 0) + _code_dot(w, x1, 1) + _code_dot(w, x2, 2)
        part += _code_dot(w, x3, 3) + _code_dot(w, x4, 4) + _code_dot(w, x5, 5)
        part += _code_dot(w, x6, 6) + _code_dot(w, x7, 7)  # (BM, BN, BKW)
        acc += part * _scale_f32(b.to(tl.int32), MX)[None, :, :]
    y = tl.sum(acc, axis=2)  # (BM, BN)
    if HAS_ROW_SCALE:
        y = y * tl.load(rs_ptr + rn, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    if FUSED:  # the tile's last split sums the partials into y
        splitk_last(out_ptr, y_ptr, b_ptr, cnt_ptr, pid_n, M, N, 0, pid_n * BLOCK_N, stride_os,
                    stride_om, stride_ym, SPLIT, BLOCK_M, BLOCK_N, FINISH_BIAS,
                    WARPS)  # fmt: skip


@triton.jit
def _fp4_mma_kernel(
    x_ptr, w_ptr, s_ptr, rs_ptr, b_ptr, out_ptr, y_ptr, cnt_ptr, M, N, KW,
    stride_xm, stride_wn, stride_sn, stride_os, stride_om, stride_ym,
    GROUP: tl.constexpr, MX: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP: tl.constexpr, K_TILES: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
    FUSED: tl.constexpr, FINISH_BIAS: tl.constexpr, WARPS: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    # SWAP accumulates acc^T (BN, BM) += W x^T: on Hopper the decoded tile is then wgmma's A
    # operand, which may come from registers, and a small M becomes the MMA's N (see
    # wna16_tiled.py). Grouped ordering: GROUP_M row tiles sweep N together (L2 reuse of W).
    # SPLIT_K > 1: program_id(1) takes every SPLIT_K-th part of K and writes fp32 partials to
    # out_ptr (split, M, N); the tile's last split sums them into y (FUSED), else a reduce launch
    BKW: tl.constexpr = BLOCK_K // 8
    dt = y_ptr.dtype.element_ty
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    TILES_PER: tl.constexpr = (K_TILES + SPLIT_K - 1) // SPLIT_K
    k_lo = tl.program_id(1) * TILES_PER
    # K % G == 0 and G divides BLOCK_K: masks at whole groups
    for kt in range(k_lo, tl.minimum(k_lo + TILES_PER, K_TILES)):
        kw = kt * BKW + tl.arange(0, BKW)
        rk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]  # (BM, BK)
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=m_mask[:, None] & (rk < KW * 8)[None, :], other=0.0)
        x = x.to(dt)  # float32 after W4A4's activation simulation
        wd = _dequant_tile(w_ptr, s_ptr, rn, kw, n_mask, stride_wn, stride_sn, KW, GROUP, MX,
                           True, "")  # fmt: skip
        wd = wd.to(dt)  # (BN, BK): exact in bf16 and fp16 (see the module docstring)
        if SWAP:
            acc = tl.dot(wd, tl.trans(x), acc)  # (BN, BM)
        else:
            acc = tl.dot(x, tl.trans(wd), acc)  # (BM, BN)
    if SWAP:
        acc = tl.trans(acc)  # (BM, BN)
    if HAS_ROW_SCALE:
        acc = acc * tl.load(rs_ptr + rn, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + tl.program_id(1) * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    if FUSED:
        splitk_last(out_ptr, y_ptr, b_ptr, cnt_ptr, tl.program_id(0), M, N, pid_m * BLOCK_M,
                    pid_n * BLOCK_N, stride_os, stride_om, stride_ym, SPLIT_K, BLOCK_M, BLOCK_N,
                    FINISH_BIAS, WARPS)  # fmt: skip


def _gemv(x2, w32, sb, rs, bias, G, mx, out_dtype, over) -> Tensor:
    """Launch the split-K GEMV (+ the reduce when K is split); (M, N) out_dtype."""
    M, K = x2.shape
    N, KW = w32.shape
    assert M <= GEMV_MAX_M, f"M={M}: the fp4 GEMV is the small-M path (M ≤ {GEMV_MAX_M})"
    bn, bk, per_split, warps, stages = _gemv_config(M, N, K, **over)
    split = triton.cdiv(triton.cdiv(K, bk), per_split)
    even = N % bn == 0 and K == split * per_split * bk
    tiles = triton.cdiv(N, bn)
    o = SplitKOutputs(split, M, N, out_dtype, x2.device, tiles)
    dummy = w32  # never read when the flag that needs it is off
    _fp4_gemv_kernel[(tiles, split)](
        x2, w32, sb, rs if rs is not None else dummy, bias if bias is not None else dummy,
        o.part, o.out, o.counters, M, N, KW, x2.stride(0), w32.stride(0), sb.stride(0),
        o.part.stride(0), o.part.stride(1), o.out.stride(0),
        GROUP=G, MX=mx, HAS_ROW_SCALE=rs is not None, HAS_BIAS=bias is not None and split == 1,
        BLOCK_M=triton.next_power_of_2(M), BLOCK_N=bn, BLOCK_K=bk, PER_SPLIT=per_split,
        EVEN=even, STAGES=stages, SPLIT=split, FUSED=o.fused,
        FINISH_BIAS=bias is not None, WARPS=warps,
        **pdl(x2.device), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return o.result(bias)


def _mma(x2, w32, sb, rs, bias, G, mx, out_dtype, over) -> Tensor:
    """Launch the tiled decode-in-registers MMA kernel; (M, N) out_dtype."""
    M, K = x2.shape
    N, KW = w32.shape
    cfg = _mma_config(M, N, K, G)
    if set(over) - set(cfg):
        raise ValueError(
            f"unknown fp4 MMA config keys {sorted(set(over) - set(cfg))}; use {list(cfg)}"
        )
    cfg.update(over)
    bm, bn, bk = cfg["bm"], cfg["bn"], cfg["bk"]
    assert bk % G == 0, f"bk={bk} must be a multiple of the group size {G}"
    assert min(bm, bn, bk) >= 16 and all(t & (t - 1) == 0 for t in (bm, bn, bk)), (
        f"tile {bm}x{bn}x{bk}: powers of two ≥ 16 (tl.dot)"
    )
    k_tiles = triton.cdiv(KW, bk // 8)
    split = max(1, min(cfg["split"], k_tiles))
    split = triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))  # no empty split
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    o = SplitKOutputs(split, M, N, out_dtype, x2.device, tiles)
    dummy = w32  # never read when the flag that needs it is off
    _fp4_mma_kernel[(tiles, split)](
        x2, w32, sb, rs if rs is not None else dummy, bias if bias is not None else dummy,
        o.part, o.out, o.counters, M, N, KW, x2.stride(0), w32.stride(0), sb.stride(0),
        o.part.stride(0), o.part.stride(1), o.out.stride(0),
        GROUP=G, MX=mx, HAS_ROW_SCALE=rs is not None, HAS_BIAS=bias is not None and split == 1,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["group_m"], SWAP=bool(cfg["swap"]),
        K_TILES=k_tiles, EVEN_K=KW % (bk // 8) == 0, SPLIT_K=split, FUSED=o.fused,
        FINISH_BIAS=bias is not None, WARPS=cfg["warps"],
        **pdl(x2.device), num_warps=cfg["warps"], num_stages=cfg["stages"],
    )  # fmt: skip
    return o.result(bias)


def fp4_gemm(
    x: Tensor,
    weight: Tensor,
    block_scale: Tensor,
    row_scale: Tensor | None,
    group_size: int,
    bias: Tensor | None = None,
    mx: bool = False,
    config: dict | None = None,
    *,
    input_scale: Tensor | None = None,
    divisor: bool = False,
) -> Tensor:
    """x @ dequant(W)^T (+ bias) for NVFP4 / MXFP4 weights, decoded in the kernel.

    x            (..., K)    bf16 / fp16
    weight       (N, K / 2)  uint8, two e2m1 codes a byte, low nibble = even k
    block_scale  (N, K / G)  float8_e4m3fn (NVFP4) or uint8 e8m0 (mx=True)
    row_scale    (N,)        float32 multiplier of each row (NVFP4), or None
    bias         (N,)        or None
    config       {"path": "gemv" | "mma", and that path's overrides}: tuning; default path is
                 "gemv" for M ≤ GEMV_MAX_M
    input_scale  () / (1,)   NVFP4 W4A4 activation scale (the reference's `input_global_scale`,
                 `divisor` its convention): x is fake-quantized by the reference routine first
    returns      (..., N)    x.dtype
    """
    N, KB = weight.shape
    K, G = 2 * KB, group_size
    assert x.shape[-1] == K, f"x {tuple(x.shape)} does not match weight {tuple(weight.shape)}"
    assert x.dtype in (torch.bfloat16, torch.float16), x.dtype
    assert weight.dtype == torch.uint8 and weight.stride(-1) == 1, (weight.dtype, weight.stride())
    assert G % 8 == 0 and K % G == 0, f"K={K} must be a multiple of group {G} (a multiple of 8)"
    sdt = torch.uint8 if mx else torch.float8_e4m3fn
    assert block_scale.shape == (N, K // G) and block_scale.dtype == sdt, (
        f"block_scale {block_scale.dtype} {tuple(block_scale.shape)}; want {sdt} {(N, K // G)}"
    )
    assert block_scale.stride(-1) == 1, block_scale.stride()
    for name, t in (("row_scale", row_scale), ("bias", bias)):  # read at unit stride
        assert t is None or (t.shape == (N,) and t.is_contiguous()), (name, t.shape, N)
    assert row_scale is None or row_scale.dtype == torch.float32, row_scale.dtype
    if input_scale is not None and mx:
        raise ValueError("MXFP4 activations (W4A4) are not supported; pass input_scale=None")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, N)
    if input_scale is not None:  # float32 (M, K): the reference's simulated NVFP4 activations
        x2 = reference.fake_quant_nvfp4_act(x2, input_scale, divisor=divisor)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    M = x2.shape[0]
    w32 = weight.view(torch.int32)  # (N, K / 8): nibble i of word j is k = 8j + i
    sb = block_scale.view(torch.uint8)  # decoded from its bits in the kernel
    over = dict(config or {})
    path = over.pop("path", None) or ("gemv" if M <= GEMV_MAX_M else "mma")
    if path not in ("gemv", "mma"):
        raise ValueError(f"fp4_gemm path {path!r}; use 'gemv' or 'mma'")
    launch = _gemv if path == "gemv" else _mma
    return launch(x2, w32, sb, row_scale, bias, G, mx, x.dtype, over).reshape(*lead, N)
