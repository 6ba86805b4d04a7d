"""Small-M W8A8 GEMV on the tensor cores (FP8 e4m3 on sm_89+, INT8 on sm_80+), weights as
stored: (N, K) row-major, no repacking.

y[m, n] = (Σ_k xq[m, k] · wq[n, k]) · xs[m] · ws[n] (+ bias[n]) for M ≤ 16 rows of quantized x.

An `mma.m16n8k32` A fragment of 8-bit values is four 32-bit registers per lane: row g (of the
lane 4 g + c) holds the MMA's k = 4 c … 4 c + 3 and 16 + 4 c …, row g + 8 the same k. Any
permutation of k works as long as A and B (x) use the same one, so a lane loads 16 contiguous
bytes of weight row g and of row g + 8 at k = 16 c … 16 c + 15 (one 128-bit load each) and 16
bytes of x at the same k, and gives byte 8 s + i (i < 4) the MMA's k slot 4 c + i and byte
8 s + 4 + i the slot 16 + 4 c + i of step s ∈ {0, 1}: two MMAs a 64-wide block, three loads,
nothing else in the loop (the CUDA-core GEMV, `w8a8_gemv.py`, converts and multiplies every
value). The output rows are the MMA's rows (swap AB); x's rows are its N, 8 a tile.

One warp owns 16 weight rows, a program WARPS warps; K splits over programs in whole 64-wide
blocks, and the last split of a tile sums the fp32 partials (`common.splitk_last`). Every tensor
is one element a lane (see `wna16_mma.py`); loads and MMAs are inline PTX, so there is no
interpreter path: the CPU tests emulate the fragments (`emulate`), the GPU tests run it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.triton.common import SplitKOutputs, pdl, pdl_enter, splitk_last
from lowbit.kernels.triton.wna16_mma import _ld4, _zeros

NUM_SMS = 132
MAX_M = 16


def supported(N: int, K: int, weight_row_stride: int) -> bool:
    """Shapes the kernel takes: whole 16-row tiles, whole 64-wide K blocks, 16-byte rows."""
    return N % 16 == 0 and K % 64 == 0 and weight_row_stride % 16 == 0


def emulate(xq: Tensor, wq: Tensor) -> Tensor:
    """The kernel's integer-exact sum Σ_k x·w (float64), lane by lane: each lane's loaded bytes
    go to the A / B fragment slots by the PTX ISA's m16n8k32 layout, and the products are
    summed where the C fragment puts them (for the CPU tests of the k mapping)."""
    M, K = xq.shape
    N = wq.shape[0]
    x, w = xq.double(), wq.double()
    y = torch.zeros(M, N, dtype=torch.float64)
    lanes = torch.arange(32)
    g, c = lanes // 4, lanes % 4
    for n0 in range(0, N, 16):
        for k0 in range(0, K, 64):
            for s in range(2):
                A = torch.zeros(16, 32, dtype=torch.float64)  # (MMA row, MMA k)
                B = torch.zeros(32, 8 * ((M + 7) // 8), dtype=torch.float64)  # (MMA k, m)
                for i in range(8):  # lane byte 8 s + i of its 16 at k0 + 16 c
                    k = k0 + 16 * c + 8 * s + i
                    slot = 4 * c + (i % 4) + 16 * (i // 4)
                    A[g, slot] = w[n0 + g, k]
                    A[g + 8, slot] = w[n0 + g + 8, k]
                    for m in range(M):
                        B[slot[g == m % 8], m] = x[m, k[g == m % 8]]
                y[:, n0 : n0 + 16] += (A @ B[:, :M]).t()
    return y


@triton.constexpr_function
def _asm(MT, IS_INT):
    """MT m16n8k32 MMAs of one step: $0..$4MT-1 out; in: a0..a3, 2 MT x registers, 4 MT acc."""
    kind = "s32.s8.s8.s32" if IS_INT else "f32.e4m3.e4m3.f32"
    o = 4 * MT
    a = ", ".join(f"${o + i}" for i in range(4))
    b0, c0 = o + 4, o + 4 + 2 * MT
    lines = []
    for t in range(MT):
        d = ", ".join(f"${4 * t + i}" for i in range(4))
        c = ", ".join(f"${c0 + 4 * t + i}" for i in range(4))
        b = f"${b0 + 2 * t}, ${b0 + 2 * t + 1}"
        lines.append(
            f"mma.sync.aligned.m16n8k32.row.col.{kind} {{{d}}}, {{{a}}}, {{{b}}}, {{{c}}};"
        )
    return "\n".join(lines)


@triton.constexpr_function
def _constraints(MT, IS_INT):
    acc = "r" if IS_INT else "f"
    return ",".join([f"={acc}"] * (4 * MT) + ["r"] * (4 + 2 * MT) + [acc] * (4 * MT))


@triton.jit
def _w8a8_mma_kernel(
    x_ptr, xz_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, y_ptr, cnt_ptr,
    M, N, K, per_split,
    stride_xm, stride_wn, stride_xsm, stride_os, stride_om, stride_ym,
    IS_INT: tl.constexpr, HAS_BIAS: tl.constexpr, MT: tl.constexpr, WARPS: tl.constexpr,
    UNROLL: tl.constexpr, SPLIT: tl.constexpr, FUSED: tl.constexpr,
    FINISH_BIAS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    idx = tl.arange(0, 32 * WARPS)  # element i: lane i % 32 of warp i // 32
    lane = idx % 32
    g = lane // 4
    c = lane % 4
    n_lo = (pid_n * WARPS + idx // 32) * 16 + g  # the warp's rows g and g + 8
    wa_ptr = w_ptr + n_lo * stride_wn + c * 16
    wb_ptr = wa_ptr + 8 * stride_wn
    acc_t = tl.int32 if IS_INT else tl.float32
    zero = tl.zeros([32 * WARPS], acc_t)
    acc = (zero,) * (4 * MT)
    b_lo = pid_k * per_split
    for b0 in tl.range(b_lo, b_lo + per_split, UNROLL):
        for u in tl.static_range(UNROLL):
            k0 = (b0 + u) * 64
            wa = _ld4(wa_ptr + k0, True)
            wb = _ld4(wb_ptr + k0, True)
            xr = ()
            for t in tl.static_range(MT):
                m = t * 8 + g
                p = tl.where(m < M, x_ptr + m * stride_xm + k0 + c * 16, xz_ptr)
                xr = xr + _ld4(p, False)
            for s in tl.static_range(2):
                bs = ()
                for t in tl.static_range(MT):
                    bs = bs + (xr[4 * t + 2 * s], xr[4 * t + 2 * s + 1])
                acc = tl.inline_asm_elementwise(
                    _asm(MT, IS_INT), _constraints(MT, IS_INT),
                    (wa[2 * s], wb[2 * s], wa[2 * s + 1], wb[2 * s + 1]) + bs + acc,
                    dtype=(acc_t,) * (4 * MT), is_pure=True, pack=1,
                )  # fmt: skip
    # accumulator 4 t + i: row n_lo (+ 8 for i ≥ 2), x row 8 t + 2 c + i % 2
    for r in tl.static_range(4 * MT):
        m = (r // 4) * 8 + 2 * c + (r % 2)
        n = n_lo + 8 * ((r % 4) // 2)
        xs = tl.load(xs_ptr + m * stride_xsm, mask=m < M, other=0.0)
        v = acc[r].to(tl.float32) * xs * tl.load(ws_ptr + n)
        if HAS_BIAS:
            v += tl.load(b_ptr + n).to(tl.float32)
        ptrs = out_ptr + pid_k * stride_os + m * stride_om + n
        tl.store(ptrs, v.to(out_ptr.dtype.element_ty), mask=m < M)
    if FUSED:  # the tile's last split sums the partials into y
        splitk_last(out_ptr, y_ptr, b_ptr, cnt_ptr, pid_n, M, N, 0, pid_n * WARPS * 16,
                    stride_os, stride_om, stride_ym, SPLIT, 8 * MT, WARPS * 16, FINISH_BIAS,
                    WARPS)  # fmt: skip


def _config(M: int, N: int, K: int, **over) -> dict[str, int]:
    """x tiles `mt`; `warps` a program (16 rows each); `waves` of warps an SM the K splits aim
    at (whole 64-wide blocks, dividing evenly, at most `max_split`); blocks a loop step
    `unroll` (loads in flight)."""
    mt = 1 if M <= 8 else 2
    c = {"warps": 4, "waves": 16, "max_split": 16, "unroll": 4}
    if set(over) - set(c):
        raise ValueError(
            f"unknown w8a8_mma config keys {sorted(set(over) - set(c))}; use {list(c)}"
        )
    c.update(over)
    c["mt"] = mt
    tiles = N // 16
    while tiles % c["warps"]:
        c["warps"] //= 2
    blocks = K // 64
    want = max(1, min(c["max_split"], c["waves"] * NUM_SMS // tiles))
    per = max(1, triton.cdiv(blocks, want))
    while blocks % per:
        per += 1
    while per % c["unroll"]:
        c["unroll"] //= 2
    c["per_split"] = per
    return c


def w8a8_mma_gemv(
    xq: Tensor,
    xs: Tensor,
    weight: Tensor,
    ws: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    config: dict | None = None,
) -> Tensor:
    """(M, N) = dequant(xq @ weight^T) (+ bias) for M ≤ MAX_M rows; the arguments of
    `w8a8_gemv.w8a8_gemv` (xq (M, K) and weight (N, K) int8 or float8_e4m3fn, xs (M, 1) and ws
    (N,) float32), shapes `supported`, 16-byte aligned rows."""
    M, K = xq.shape
    N = weight.shape[0]
    assert 0 < M <= MAX_M, f"M={M}: the tensor-core GEMV takes M ≤ {MAX_M}"
    assert weight.dtype == xq.dtype and weight.stride(-1) == 1 and xq.stride(-1) == 1
    assert supported(N, K, weight.stride(0)) and xq.stride(0) % 16 == 0, (weight.shape, xq.stride())
    assert weight.data_ptr() % 16 == 0 and xq.data_ptr() % 16 == 0
    cfg = _config(M, N, K, **(config or {}))
    split = (K // 64) // cfg["per_split"]
    grid = (N // (16 * cfg["warps"]), split)
    o = SplitKOutputs(split, M, N, out_dtype, xq.device, grid[0])
    dummy = ws
    _w8a8_mma_kernel[grid](
        xq, _zeros(xq.device).view(xq.dtype), weight, xs, ws, bias if bias is not None else dummy, o.part,
        o.out, o.counters, M, N, K, cfg["per_split"],
        xq.stride(0), weight.stride(0), xs.stride(0), o.part.stride(0), o.part.stride(1),
        o.out.stride(0), IS_INT=xq.dtype == torch.int8,
        HAS_BIAS=bias is not None and split == 1, MT=cfg["mt"], WARPS=cfg["warps"],
        UNROLL=cfg["unroll"], SPLIT=split, FUSED=o.fused, FINISH_BIAS=bias is not None,
        **pdl(xq.device), num_warps=cfg["warps"],
    )  # fmt: skip
    return o.result(bias)
