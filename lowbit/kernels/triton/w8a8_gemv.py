"""Small-M W8A8 (FP8 e4m3 or INT8) GEMV on the CUDA cores: split-K, dequant in the epilogue;
the same kernel without scales is the 16-bit GEMV (`gemv16`, bf16/fp16 weights and x).

y[m, n] = (Σ_k xq[m, k] · wq[n, k]) · xs[m] · ws[n] (+ bias[n]), for M ≤ MAX_M rows of
already-quantized activations (the caller's per-token `act_quant`, or a static scale). The
numerics are the tensor-core kernel's: 8-bit codes multiplied exactly (fp8 × fp8 fits an fp32
mantissa, int8 × int8 an int32) and summed in fp32 / int32.

Why not the MMA kernel at M = 1: a (16, BN) tile wastes 15 of 16 MMA rows and its smem pipeline
holds few bytes in flight per SM; batch-1 decode is a pure weight stream. Here a program owns
BLOCK_N weight rows and one K range for all M rows; each thread loads 16 contiguous bytes of a
row per step and keeps a (M, BLOCK_N, BLOCK_K) register accumulator, reduced across lanes once at
the end, so the loop is loads and FMAs only. Splits write fp32 partials; the last program of a
row block to finish sums them (+ bias) into the output (`common.splitk_last`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.dispatch import DeferredQuant
from lowbit.kernels.triton.act_quant import EPS, quantize_with
from lowbit.kernels.triton.common import (
    SplitKOutputs,
    pdl,
    pdl_enter,
    splitk_last,
)

NUM_SMS = 132
MAX_M = 2  # every row is a register accumulator of BLOCK_N × BLOCK_K
# A program's first weight tile is loaded before the PDL wait (weights are never written by a
# kernel; x is read after it), as the `mma16` kernel's EARLY, for weights of these dtypes. H100
# batch-1 decode tok/s, off → on: run 13 (the 3-D kernel) fp8 269 → 263, int8 271 → 275, bf16
# 173 → 175; run 15 (per-row kernel, after the early RMSNorm loads) fp8 295 / 294 → 298 / 296,
# int8 288 / 288 → 285 / 286, bf16 178 → 175 — so fp8 only. bench_decode.py `+early8` (all).
EARLY_DTYPES = (torch.float8_e4m3fn,)
# FP8 and 16-bit weights take the per-row accumulators (the kernel's ROWS): the (M, BN, BK)
# accumulator's layout made Triton read each weight tile back from shared memory one byte a
# load (sm_90 SASS of the qkv config: 184 instructions a 32-weight tile, 39 of them LDS); the
# per-row one forms every product in the loaded tile's layout (1,120 for a program's 8 tiles,
# prologue and epilogue included: 140 a tile). H100,
# benchmarks/RESULTS.md run 14, µs at M = 1 (3-D → rows): FP8 qkv 13.1 → 12.3, o 10.0 → 9.4,
# gate_up 48.4 → 45.9, down 27.1 → 26.2; bf16 qkv 22.2 → 21.5, gate_up 85.2 → 83.6; decode
# batch 1 fp8 274 → 287 tok/s, bf16 174 → 176. INT8 keeps the 3-D kernel: per row it was
# slower on o (10.1 → 11.2) and down (28.0 → 31.2) and int8 decode fell 276 → 222.
ROW_ACC = True


def _config(
    M: int,
    N: int,
    K: int,
    bn: int = 16,
    bk: int = 256,
    warps: int = 4,
    stages: int = 1,
    waves: int = 4,
    early: int | None = None,
) -> tuple[int, int, int, int, int, bool | None]:
    """(BLOCK_N, BLOCK_K, per_split tiles, num_warps, num_stages, early; None: `_gemv` decides
    by the weight's dtype, EARLY_DTYPES).

    Splits aim at `waves` programs an SM, in whole BLOCK_K tiles that divide evenly.
    """
    bk = min(bk, triton.next_power_of_2(K))
    tiles = triton.cdiv(K, bk)
    rows = triton.cdiv(N, bn)
    want = max(1, (waves * NUM_SMS) // rows)
    per_split = max(1, triton.cdiv(tiles, want))
    return bn, bk, per_split, warps, stages, None if early is None else bool(early)


@triton.jit
def _w8a8_gemv_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, y_ptr, cnt_ptr, M, N, K,
    stride_xm, stride_wn, stride_xsm, stride_os, stride_om, stride_ym,
    IS_INT: tl.constexpr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PER_SPLIT: tl.constexpr, EVEN: tl.constexpr, STAGES: tl.constexpr,
    SPLIT: tl.constexpr, FUSED: tl.constexpr, FINISH_BIAS: tl.constexpr, WARPS: tl.constexpr,
    EARLY: tl.constexpr, DEFER: tl.constexpr, N_AMAX: tl.constexpr, BLOCK_AMAX: tl.constexpr,
    QMAX: tl.constexpr, EPS: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """DEFER: x is in the compute dtype and xs holds N_AMAX partial absmaxes a row
    (`dispatch.DeferredQuant`); x is quantized here as `act_quant` would, scale max / QMAX.
    ROWS: every product is formed in the weight tile's own register layout (16 contiguous
    bytes of a row a thread), one accumulator a row of x (BLOCK_M = M ≤ 2); else one
    (BLOCK_M, BLOCK_N, BLOCK_K) accumulator (see ROW_ACC)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    k0 = pid_k * PER_SPLIT * BLOCK_K
    acc_t = tl.int32 if IS_INT else tl.float32
    if EARLY:  # weights are never written by a kernel: the first tile may load before the wait
        w_first = _w_tile(w_ptr, rn, n_mask, k0, K, stride_wn, BLOCK_K, EVEN, acc_t)
    pdl_enter(PDL)
    if ROWS:  # one (BLOCK_N, BLOCK_K) accumulator a row of x (BLOCK_M = M): ROW_ACC
        scales = ()  # each row's quantization scale (DEFER), from its partial absmaxes
        for m in tl.static_range(BLOCK_M):
            if DEFER:
                p = tl.arange(0, BLOCK_AMAX)
                amax = tl.load(xs_ptr + m * stride_xsm + p, mask=p < N_AMAX, other=0.0)
                scales = scales + (tl.maximum(tl.max(amax, axis=0), EPS) / QMAX,)
            else:
                scales = scales + (1.0,)
        code_t = w_ptr.dtype.element_ty
        accs = (tl.zeros([BLOCK_N, BLOCK_K], acc_t),) * BLOCK_M
        if EARLY:
            accs = _rows_step(accs, w_first, x_ptr, k0, K, stride_xm, BLOCK_M, BLOCK_K, EVEN, acc_t,
                              DEFER, scales, QMAX, IS_INT, code_t)  # fmt: skip
        for t in tl.range(1 if EARLY else 0, PER_SPLIT, num_stages=STAGES):
            k = k0 + t * BLOCK_K
            w = _w_tile(w_ptr, rn, n_mask, k, K, stride_wn, BLOCK_K, EVEN, acc_t)
            accs = _rows_step(accs, w, x_ptr, k, K, stride_xm, BLOCK_M, BLOCK_K, EVEN, acc_t, DEFER,
                              scales, QMAX, IS_INT, code_t)  # fmt: skip
        if SCALED:
            ws = tl.load(ws_ptr + rn, mask=n_mask, other=0.0)
        for m in tl.static_range(BLOCK_M):
            y = tl.sum(accs[m], axis=1).to(tl.float32)  # (BN,)
            if SCALED:
                xs = scales[m] if DEFER else tl.load(xs_ptr + m * stride_xsm)
                y = y * xs * ws
            if HAS_BIAS:
                y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
            out = out_ptr + pid_k * stride_os + m * stride_om + rn
            tl.store(out, y.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        x_scale = tl.full([BLOCK_M], 1.0, tl.float32)
        if DEFER:  # the row's scale from its partial absmaxes (rows ≥ M: EPS, x there is 0)
            p = tl.arange(0, BLOCK_AMAX)
            amax = tl.load(xs_ptr + rm[:, None] * stride_xsm + p[None, :],
                           mask=m_mask[:, None] & (p < N_AMAX)[None, :], other=0.0)  # fmt: skip
            x_scale = tl.maximum(tl.max(amax, axis=1), EPS) / QMAX
        code_t = w_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], acc_t)
        if EARLY:
            x = _x_tile(x_ptr, rm, m_mask, k0, K, stride_xm, BLOCK_K, EVEN, acc_t, DEFER, x_scale,
                        QMAX, IS_INT, code_t)  # fmt: skip
            acc += w_first.to(acc_t)[None, :, :] * x.to(acc_t)[:, None, :]
        # a constant trip count (few distinct values: one per shape); the loop's num_stages
        # prefetches its loads (the launch's num_stages pipelines only loads that feed a tl.dot)
        for t in tl.range(1 if EARLY else 0, PER_SPLIT, num_stages=STAGES):
            k = k0 + t * BLOCK_K
            w = _w_tile(w_ptr, rn, n_mask, k, K, stride_wn, BLOCK_K, EVEN, acc_t)
            x = _x_tile(x_ptr, rm, m_mask, k, K, stride_xm, BLOCK_K, EVEN, acc_t, DEFER, x_scale,
                        QMAX, IS_INT, code_t)  # fmt: skip
            acc += w.to(acc_t)[None, :, :] * x.to(acc_t)[:, None, :]
        y = tl.sum(acc, axis=2).to(tl.float32)  # (BM, BN)
        if SCALED:
            if DEFER:
                xs = x_scale
            else:
                xs = tl.load(xs_ptr + rm * stride_xsm, mask=m_mask, other=0.0)
            ws = tl.load(ws_ptr + rn, mask=n_mask, other=0.0)
            y = y * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    if FUSED:  # the tile's last split sums the partials into y
        splitk_last(out_ptr, y_ptr, b_ptr, cnt_ptr, pid_n, M, N, 0, pid_n * BLOCK_N, stride_os,
                    stride_om, stride_ym, SPLIT, BLOCK_M, BLOCK_N, FINISH_BIAS,
                    WARPS)  # fmt: skip


@triton.jit
def _rows_step(accs, w, x_ptr, k, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
               EVEN: tl.constexpr, acc_t: tl.constexpr, DEFER: tl.constexpr, scales,
               QMAX: tl.constexpr, IS_INT: tl.constexpr, code_t: tl.constexpr):  # fmt: skip
    """accs + the weight tile w (BN, BK) times each row's x at column k, as (BK,) vectors."""
    wa = w.to(acc_t)
    rk = k + tl.arange(0, BLOCK_K)
    out = ()
    for m in tl.static_range(BLOCK_M):
        x = _x_codes(x_ptr + m * stride_xm + rk, rk < K, None, EVEN, acc_t, DEFER, scales[m],
                     QMAX, IS_INT, code_t)  # fmt: skip
        out = out + (accs[m] + wa * x.to(acc_t)[None, :],)
    return out


@triton.jit
def _w_tile(w_ptr, rn, n_mask, k, K, stride_wn, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
            acc_t: tl.constexpr):  # fmt: skip
    """The (BN, BK) weight tile at column k (read once: evict first). EVEN (N % BLOCK_N == 0 and
    the splits tile K exactly): no masks; else masked lanes are zero (undefined after a masked
    load, and 8-bit float pointers take no int fill)."""
    rk = k + tl.arange(0, BLOCK_K)
    ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
    if EVEN:
        w = tl.load(ptrs, eviction_policy="evict_first")
    else:
        mask = n_mask[:, None] & (rk < K)[None, :]
        w = tl.load(ptrs, mask=mask, eviction_policy="evict_first")
        w = tl.where(mask, w.to(acc_t), 0)
    return w


@triton.jit
def _x_tile(x_ptr, rm, m_mask, k, K, stride_xm, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
            acc_t: tl.constexpr, DEFER: tl.constexpr, x_scale, QMAX: tl.constexpr,
            IS_INT: tl.constexpr, code_t: tl.constexpr):  # fmt: skip
    """The (BM, BK) activation tile at column k; rows ≥ M (and columns ≥ K) zero. DEFER: x
    in the compute dtype, returned as its codes (code_t) at the rows' scales x_scale (BM,)."""
    rk = k + tl.arange(0, BLOCK_K)
    ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    return _x_codes(ptrs, m_mask[:, None] & (rk < K)[None, :], m_mask[:, None], EVEN, acc_t,
                    DEFER, x_scale[:, None], QMAX, IS_INT, code_t)  # fmt: skip


@triton.jit
def _x_codes(ptrs, mask, even_mask, EVEN: tl.constexpr, acc_t: tl.constexpr,
             DEFER: tl.constexpr, scale, QMAX: tl.constexpr, IS_INT: tl.constexpr,
             code_t: tl.constexpr):  # fmt: skip
    """x at ptrs, zero where not `mask` (EVEN: only `even_mask` masks, None for none). DEFER: x
    is 16-bit and comes back as its codes (code_t) at `scale` (masked lanes load 0, code 0)."""
    if DEFER:
        x = tl.load(ptrs, mask=mask, other=0.0)
        x = quantize_with(x.to(tl.float32), scale, QMAX, IS_INT).to(code_t)
    elif EVEN:
        x = tl.load(ptrs, mask=even_mask)
    else:
        x = tl.load(ptrs, mask=mask)
        x = tl.where(mask, x.to(acc_t), 0)
    return x


def w8a8_gemv(
    xq: Tensor,
    xs: Tensor,
    weight: Tensor,
    ws: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    config: dict | None = None,
) -> Tensor:
    """(M, N) = dequant(xq @ weight^T) (+ bias) for M ≤ MAX_M quantized activation rows.

    xq      (M, K)  int8 / float8_e4m3fn, row stride ≥ K, unit column stride; or a
                    dispatch.DeferredQuant to weight's dtype (M, K), quantized as loaded
    xs      (M, 1)  float32 per-row activation scales (None with a DeferredQuant)
    weight  (N, K)  same dtype as xq, unit column stride
    ws      (N,)    float32 per-output-channel weight scales (expanded when per tensor)
    config  keyword overrides of `_config` (bn, bk, warps, stages, waves, early): tuning
    """
    cfg = _config(xq.shape[0], weight.shape[0], xq.shape[1], **(config or {}))
    if isinstance(xq, DeferredQuant):
        assert xs is None and xq.qdtype == weight.dtype, (xq.qdtype, weight.dtype)
        x = xq.x.reshape(-1, xq.shape[-1])
        return _gemv(x, xq.amax, weight, ws, bias, out_dtype, cfg, qmax=xq.qmax)
    return _gemv(xq, xs, weight, ws, bias, out_dtype, cfg)


# bf16/fp16 weights: 8-row blocks, 512 values (1 KiB) a row per tile, loads 3 deep — H100, run 8
# of benchmarks/RESULTS.md (µs vs cuBLAS): qkv 22.1 / 22.7, o 16.1 / 17.7, gate_up 85.0 / 88.6,
# down 47.3 / 48.4, lm_head (128256 × 4096) 350 / 381.
GEMV16_DEFAULTS = {"bn": 8, "bk": 512, "warps": 4, "stages": 3, "waves": 8}


def gemv16(x: Tensor, weight: Tensor, bias: Tensor | None = None, config: dict | None = None):
    """(M, N) = x @ weight^T (+ bias) for M ≤ MAX_M rows of bf16/fp16 x and a weight of the same
    dtype (N, K), unit column stride: the GEMV above with fp32 products and no scales."""
    assert x.dtype in (torch.bfloat16, torch.float16), x.dtype
    cfg = {**GEMV16_DEFAULTS, **(config or {})}
    cfg = _config(x.shape[0], weight.shape[0], x.shape[1], **cfg)
    return _gemv(x, None, weight, None, bias, x.dtype, cfg)


def _gemv(xq, xs, weight, ws, bias, out_dtype, cfg, qmax: float | None = None) -> Tensor:
    """Launch the GEMV (`xs`, `ws` None: unscaled). `qmax` given: xq is 16-bit and xs its rows'
    partial absmaxes (M, P), quantized in the kernel (a DeferredQuant's)."""
    M, K = xq.shape
    N = weight.shape[0]
    defer = qmax is not None
    assert 0 < M <= MAX_M, f"M={M}: the GEMV is the small-M path (M ≤ {MAX_M})"
    assert (weight.dtype == xq.dtype) != defer, (weight.dtype, xq.dtype)
    assert weight.stride(-1) == 1 and xq.stride(-1) == 1 and (not defer or xs.stride(1) == 1)
    assert weight.shape[1] == K, (weight.shape, xq.shape)
    bn, bk, per_split, warps, stages, early = cfg
    split = triton.cdiv(triton.cdiv(K, bk), per_split)
    even = N % bn == 0 and K == split * per_split * bk
    tiles = triton.cdiv(N, bn)
    o = SplitKOutputs(split, M, N, out_dtype, xq.device, tiles)
    scaled = xs is not None
    dummy = o.part  # never read when the flag that needs it is off
    _w8a8_gemv_kernel[(tiles, split)](
        xq, weight, xs if scaled else dummy, ws if scaled else dummy,
        bias if bias is not None else dummy, o.part, o.out, o.counters, M, N, K,
        xq.stride(0), weight.stride(0), xs.stride(0) if scaled else 0, o.part.stride(0),
        o.part.stride(1), o.out.stride(0), IS_INT=weight.dtype == torch.int8, SCALED=scaled,
        HAS_BIAS=bias is not None and split == 1,
        BLOCK_M=triton.next_power_of_2(M), BLOCK_N=bn, BLOCK_K=bk, PER_SPLIT=per_split,
        EVEN=even, STAGES=stages, SPLIT=split, FUSED=o.fused,
        FINISH_BIAS=bias is not None, WARPS=warps,
        EARLY=weight.dtype in EARLY_DTYPES if early is None else early, DEFER=defer,
        N_AMAX=xs.shape[1] if defer else 1,
        BLOCK_AMAX=triton.next_power_of_2(xs.shape[1]) if defer else 1, QMAX=float(qmax or 0.0),
        EPS=EPS, ROWS=ROW_ACC and weight.dtype != torch.int8,  # BLOCK_M == M (≤ 2)
        **pdl(xq.device), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return o.result(bias)
