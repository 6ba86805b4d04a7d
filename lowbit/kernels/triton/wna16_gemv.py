"""Small-M weight-only int4/int8 GEMM (W4A16 / W8A16 decode): split-K GEMV on the CUDA cores.

Reads the canonical layout of `wna16_gemm.py` (qweight (K, N/P) int32 packed along N, scales
(K/G, N), qzeros (K/G, N/P) or None = symmetric, perm for act-order) and computes
y = x @ dequant(W)^T for M ≤ a few rows, where tensor cores buy nothing and the MMA path's
operand shuffles cost more than the arithmetic.

Per weight value the loop body is about one LOP3, one FFMA per row of x and half a shift:
  * code i of a word is moved to bit 15 or 19 of an fp32 mantissa (int4 codes 2j and 2j+1 share
    one shift) and masked and OR-ed with the exponent of its offset 2^(23 - bit) in one LOP3
    (`common.and_or_f32`; ptxas would emit two), which makes the float offset + code exactly
    (no int→float conversion);
  * the products x·(offset + code) are summed over a chunk of CHUNK rows of one group, and the
    offset and zero are removed once per chunk: Σ x (q − z) = Σ x (off + q) − (off + z) Σ x,
    then the chunk is scaled by its group scale. The offsets are small (16 or 256 for int4,
    256 for int8), so fp32 keeps ≥ 15 bits of the result.
A program owns BLOCK_W packed words (P·BLOCK_W columns) and `per_split` chunks of K; each
thread loads 4 words (16 bytes) a row and sums its rows in registers before lanes combine.
Splits write fp32 partials; the last program of a column block to finish sums them (+ bias)
into the output (`common.splitk_last`; `common.splitk_finish`, one more launch, when the fused
finish is off). With one split the kernel writes the output itself. Everything is CUDA-graph safe.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.triton.common import (
    SplitKOutputs,
    and_or_f32,
    pdl,
    pdl_enter,
    splitk_last,
)
from lowbit.kernels.triton.wna16_gemm import checked_rows

NUM_SMS = 132
MAX_M = 4  # largest M accepted (one FFMA per weight per row); dispatch uses it up to M = 2


# At M = 1 int4 weights take the pipelined config (64-row chunks, tiles unrolled, loads two
# chunks deep), with 4 waves of programs up to FEW_WAVES_MAX_NK values and 8 above: H100, run 8
# of benchmarks/RESULTS.md (after the one-LOP3 decode) — qkv 16.3 → 15.0 µs, o 16.5 → 14.2,
# down 28.6 → 26.8 with 4 waves; gate_up 33.7 µs with 8 (44.9 with 4).
FEW_WAVES_MAX_NK = 64 * 2**20


def _config(M: int, N: int, K: int, G: int, P: int, **over) -> tuple[int, ...]:
    """(BLOCK_W, BLOCK_K, CHUNK, chunks_per_split, num_warps, num_stages, UNROLL) by size.

    BLOCK_W words a program (4 per thread along N, 16-byte loads; the rest of a warp's lanes
    and the warps run along K). Splits aim at `waves` warps an SM but keep whole chunks, and
    split evenly (no bounds checks in the K loop). With unroll=1 the loop over a chunk's K
    tiles is unrolled, leaving the chunk loop as the only loop, which the software pipeliner
    then prefetches `stages` - 1 chunks ahead. `over` replaces any of block_w, block_k, chunk,
    warps, waves, stages, unroll (tuning probes).
    """
    c = {"block_w": 32 if M <= 2 else 64, "block_k": 32, "chunk": 128, "warps": 1, "waves": 8,
         "stages": 1, "unroll": 0}  # fmt: skip
    if M == 1 and P == 8:  # measured for int4 only
        c.update(chunk=64, stages=2, unroll=1, waves=4 if N * K <= FEW_WAVES_MAX_NK else 8)
    if set(over) - set(c):
        raise ValueError(f"unknown GEMV config keys {sorted(set(over) - set(c))}; use {list(c)}")
    c.update(over)
    block_w, block_k, chunk, warps, waves, stages, unroll = (
        c[k] for k in ("block_w", "block_k", "chunk", "warps", "waves", "stages", "unroll")
    )
    chunk = min(chunk, G & -G)  # a power of two dividing G: a chunk never straddles a group
    block_k = min(block_k, chunk)
    cols = triton.cdiv(N // P, block_w)
    chunks = K // chunk
    want = max(1, (waves * NUM_SMS) // (cols * warps))  # programs along K
    per_split = max(1, triton.cdiv(chunks, want))
    while chunks % per_split:
        per_split += 1
    return block_w, block_k, chunk, per_split, warps, stages, unroll


@triton.constexpr_function
def _code_pos(i, BITS):
    """Mantissa bit where code i of a word is placed: 19 (odd int4 codes) or 15 (even int4
    codes, 8-bit codes), so one shift serves both int4 codes of a byte."""
    if BITS == 4:
        return 15 + 4 * (i % 2)
    else:
        return 23 - BITS


@triton.constexpr_function
def _code_offset(i, BITS):
    """What `_codes_f32` adds to code i: 2^(23 - position) (16 or 256)."""
    return 1 << (23 - _code_pos(i, BITS))


@triton.jit
def _codes_f32(w, i: tl.constexpr, BITS: tl.constexpr):
    """Code i of each int32 word as the fp32 `_code_offset` + code (bit trick, exact): the code
    is shifted to its mantissa position and masked and OR-ed with the offset's exponent in one
    LOP3. Int4 codes 2j and 2j+1 share the shift (to bits 15 and 19)."""
    POS: tl.constexpr = _code_pos(i, BITS)
    SH: tl.constexpr = POS - BITS * i
    MAGIC: tl.constexpr = (127 + 23 - POS) << 23  # bit pattern of 2.0 ** (23 - POS)
    MASK: tl.constexpr = ((1 << BITS) - 1) << POS
    if SH >= 0:
        q = w << SH
    else:
        q = w >> -SH  # arithmetic: the sign bits it shifts in lie above the mask
    return and_or_f32(q, MASK, MAGIC)


@triton.jit
def _dot_rows(w, x, i: tl.constexpr, BITS: tl.constexpr):
    """(BM, BW) partial Σ_k x[m, k] · (offset_i + code_i[k, w]) of one tile."""
    f = _codes_f32(w, i, BITS)  # (BK, BW)
    return tl.sum(f[None, :, :] * x[:, :, None], axis=1)


@triton.jit
def _k_tile(p0, p1, p2, p3, p4, p5, p6, p7, xsum, k0, x_ptr, qw_ptr, rm, rj, m_mask, j_mask,
            stride_xm, stride_qk, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
            EVEN_W: tl.constexpr):  # fmt: skip
    """Add K rows k0… of one (BK, BW) weight tile to the per-code sums p_i and to Σx."""
    rk = k0 + tl.arange(0, BLOCK_K)
    wp = qw_ptr + rk[:, None] * stride_qk + rj[None, :]
    if EVEN_W:
        w = tl.load(wp, eviction_policy="evict_first")  # (BK, BW) int32
    else:
        w = tl.load(wp, mask=j_mask[None, :], other=0, eviction_policy="evict_first")
    xp = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    x = tl.load(xp, mask=m_mask[:, None], other=0.0).to(tl.float32)  # (BM, BK)
    xsum += tl.sum(x, axis=1)
    p0 += _dot_rows(w, x, 0, BITS)
    p1 += _dot_rows(w, x, 1, BITS)
    p2 += _dot_rows(w, x, 2, BITS)
    p3 += _dot_rows(w, x, 3, BITS)
    if BITS == 4:  # codes 4-7 exist only for 8 codes a word
        p4 += _dot_rows(w, x, 4, BITS)
        p5 += _dot_rows(w, x, 5, BITS)
        p6 += _dot_rows(w, x, 6, BITS)
        p7 += _dot_rows(w, x, 7, BITS)
    return p0, p1, p2, p3, p4, p5, p6, p7, xsum


@triton.jit
def _finish_code(acc, part, xsum, s_row, z_row, rj, j_mask, i: tl.constexpr, P: tl.constexpr,
                 BITS: tl.constexpr, HAS_ZERO: tl.constexpr):  # fmt: skip
    """acc += scale · (part − (offset + zero) · Σx) for code i's columns P·j + i."""
    s = tl.load(s_row + rj * P + i, mask=j_mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        zw = tl.load(z_row + rj, mask=j_mask, other=0)
        off = ((zw >> (BITS * i)) & ((1 << BITS) - 1)).to(tl.float32) + _code_offset(i, BITS)
    else:
        off = tl.full(s.shape, _code_offset(i, BITS) + (1 << (BITS - 1)), tl.float32)
    return acc + s[None, :] * (part - off[None, :] * xsum[:, None])


@triton.jit
def _store_code(acc, out_ptr, bias_ptr, rm, rj, m_mask, j_mask, stride_om, i: tl.constexpr,
                P: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """Write code i's columns P·j + i of a (BM, BW) block (bias added when given)."""
    cols = rj * P + i
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    ptrs = out_ptr + rm[:, None] * stride_om + cols[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & j_mask[None, :])


@triton.jit
def _wna16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, y_ptr, cnt_ptr,
    M, NW, K, per_split,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_os, stride_om, stride_ym,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
    EVEN_W: tl.constexpr, UNROLL: tl.constexpr, STAGES: tl.constexpr,
    SPLIT: tl.constexpr, FUSED: tl.constexpr, FINISH_BIAS: tl.constexpr, WARPS: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    P: tl.constexpr = 32 // BITS
    pid_w = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)  # packed word (column group) index
    m_mask = rm < M
    j_mask = rj < NW
    zero = tl.zeros([BLOCK_M, BLOCK_W], tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7 = zero, zero, zero, zero, zero, zero, zero, zero
    c_lo = pid_k * per_split
    # per_split divides the chunk count. The launch's num_stages pipelines only loads that feed
    # a tl.dot (there is none here); the loop's own num_stages pipelines these loads as well.
    for c in tl.range(c_lo, c_lo + per_split, num_stages=STAGES):
        p0, p1, p2, p3, p4, p5, p6, p7 = zero, zero, zero, zero, zero, zero, zero, zero
        xsum = tl.zeros([BLOCK_M], tl.float32)
        if UNROLL:  # the chunk loop is then innermost, so num_stages > 1 pipelines it
            for t in tl.static_range(CHUNK // BLOCK_K):
                p0, p1, p2, p3, p4, p5, p6, p7, xsum = _k_tile(
                    p0, p1, p2, p3, p4, p5, p6, p7, xsum, c * CHUNK + t * BLOCK_K, x_ptr, qw_ptr,
                    rm, rj, m_mask, j_mask, stride_xm, stride_qk, BITS, BLOCK_K, EVEN_W,
                )  # fmt: skip
        else:
            for t in range(CHUNK // BLOCK_K):
                p0, p1, p2, p3, p4, p5, p6, p7, xsum = _k_tile(
                    p0, p1, p2, p3, p4, p5, p6, p7, xsum, c * CHUNK + t * BLOCK_K, x_ptr, qw_ptr,
                    rm, rj, m_mask, j_mask, stride_xm, stride_qk, BITS, BLOCK_K, EVEN_W,
                )  # fmt: skip
        g = (c * CHUNK) // GROUP
        s_row = s_ptr + g * stride_sg
        z_row = z_ptr + g * stride_zg
        a0 = _finish_code(a0, p0, xsum, s_row, z_row, rj, j_mask, 0, P, BITS, HAS_ZERO)
        a1 = _finish_code(a1, p1, xsum, s_row, z_row, rj, j_mask, 1, P, BITS, HAS_ZERO)
        a2 = _finish_code(a2, p2, xsum, s_row, z_row, rj, j_mask, 2, P, BITS, HAS_ZERO)
        a3 = _finish_code(a3, p3, xsum, s_row, z_row, rj, j_mask, 3, P, BITS, HAS_ZERO)
        if P == 8:
            a4 = _finish_code(a4, p4, xsum, s_row, z_row, rj, j_mask, 4, P, BITS, HAS_ZERO)
            a5 = _finish_code(a5, p5, xsum, s_row, z_row, rj, j_mask, 5, P, BITS, HAS_ZERO)
            a6 = _finish_code(a6, p6, xsum, s_row, z_row, rj, j_mask, 6, P, BITS, HAS_ZERO)
            a7 = _finish_code(a7, p7, xsum, s_row, z_row, rj, j_mask, 7, P, BITS, HAS_ZERO)
    part_ptr = out_ptr
    out_ptr += pid_k * stride_os
    _store_code(a0, out_ptr, bias_ptr, rm, rj, m_mask, j_mask, stride_om, 0, P, HAS_BIAS)
    _store_code(a1, out_ptr, bias_ptr, rm, rj, m_mask, j_mask, stride_om, 1, P, HAS_BIAS)
    _store_code(a2, out_ptr, bias_ptr, rm, rj, m_mask, j_mask, stride_om, 2, P, HAS_BIAS)
    _store_code(a3, out_ptr, bias_ptr, rm, rj, m_mask, j_mask, stride_om, 3, P, HAS_BIAS)
    if P == 8:
        _store_code(a4, out_ptr, bias_ptr, rm, rj, m_mask, j_mask, stride_om, 4, P, HAS_BIAS)
        _store_code(a5, out_ptr, bias_ptr, rm, rj, m_mask, j_mask, stride_om, 5, P, HAS_BIAS)
        _store_code(a6, out_ptr, bias_ptr, rm, rj, m_mask, j_mask, stride_om, 6, P, HAS_BIAS)
        _store_code(a7, out_ptr, bias_ptr, rm, rj, m_mask, j_mask, stride_om, 7, P, HAS_BIAS)
    if FUSED:  # the tile's last split sums the partials into y
        splitk_last(
            part_ptr, y_ptr, bias_ptr, cnt_ptr, tl.program_id(2) * tl.num_programs(0) + pid_w,
            M, NW * P, tl.program_id(2) * BLOCK_M, pid_w * BLOCK_W * P, stride_os, stride_om,
            stride_ym, SPLIT, BLOCK_M, BLOCK_W * P, FINISH_BIAS, WARPS,
        )  # fmt: skip


def wna16_gemv(
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
    """`wna16_gemm` (same arguments and layout) for a few rows of x (M ≤ MAX_M); `config`
    overrides `_config` (block_w, block_k, chunk, warps, waves, stages, unroll) for tuning."""
    x2, lead, N, G = checked_rows(x, qweight, scales, qzeros, group_size, bits, bias, perm)
    P, K = 32 // bits, x2.shape[1]
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, N)
    assert M <= MAX_M, f"M={M}: wna16_gemv is the small-M path (M ≤ {MAX_M})"
    block_w, block_k, chunk, per_split, warps, stages, unroll = _config(
        M, N, K, G, P, **(config or {})
    )
    assert G % chunk == 0 and chunk % block_k == 0 and (K // chunk) % per_split == 0
    split = K // chunk // per_split
    block_m = triton.next_power_of_2(max(M, 1))
    grid = (triton.cdiv(N // P, block_w), split, triton.cdiv(M, block_m))
    o = SplitKOutputs(split, M, N, x.dtype, x.device, grid[0] * grid[2])
    dummy = qweight  # never read when the flag that needs it is off
    _wna16_gemv_kernel[grid](
        x2, qweight, scales, qzeros if qzeros is not None else dummy,
        bias if bias is not None else dummy, o.part, o.out, o.counters,
        M, N // P, K, per_split,
        x2.stride(0), qweight.stride(0), scales.stride(0),
        qzeros.stride(0) if qzeros is not None else 0, o.part.stride(0), o.part.stride(1),
        o.out.stride(0),
        GROUP=G, BITS=bits, HAS_ZERO=qzeros is not None,
        HAS_BIAS=bias is not None and split == 1, BLOCK_M=block_m, BLOCK_W=block_w,
        BLOCK_K=block_k, CHUNK=chunk, EVEN_W=(N // P) % block_w == 0, UNROLL=bool(unroll),
        STAGES=stages, SPLIT=split, FUSED=o.fused,
        FINISH_BIAS=bias is not None, WARPS=warps,
        **pdl(x.device), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return o.result(bias).reshape(*lead, N)
