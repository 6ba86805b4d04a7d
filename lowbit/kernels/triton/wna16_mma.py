"""Small-M W4A16 GEMM on the tensor cores (M ≤ 64) over int4 weights in the `mma16` layout
(`lowbit/kernels/mma16.py`: each lane's 32-bit word is its m16n8k16 A fragment).

Why: the CUDA-core GEMV (`wna16_gemv.py`) spends ~3.2 sm_90 instructions a weight (shift,
LOP3, FFMA and reductions) and cannot stream int4 weights at the memory rate; a conventional
tiled MMA kernel spends more than that moving the dequantized tile into the MMA's operand
layout. Here a word becomes the A fragment in registers (`mma16.DECODE`): LOP3 magic numbers
read a code as magic + q exactly, one FMA a register leaves q − z exactly, and `mma.sync` (inline
PTX) multiplies it by up to 8 rows of x (swap AB: the output columns are the MMA's rows, x's
rows its N; MT tiles of 8 rows, M ≤ 64); the group's scale multiplies the fp32 result. Per 8
weights: 1 (fp16) or 3 (bf16) shifts, 4 LOP3, 4 HFMA2 and one MMA an x tile.

Every tensor of the kernel is one element a lane (1-D, 32 × WARPS): a Triton 2-D load may put
another lane's values in a thread, and the MMA needs each lane's own fragment; wider loads are
inline PTX vector loads, one output a register. A program is WARPS warps, each owning E column
tiles of 16 and one K range of whole groups (with KW > 1, KW warps share a unit's columns, each
a slice of the program's groups, and their sums meet in the program: `SLICED`); splits of K
write fp32 partials that the last program to finish sums (`common.splitk_last`). There is no
interpreter path (inline PTX): the CPU tests emulate the fragments (`mma16.emulate`), the GPU
tests run the kernel. Above 64 rows `dequant_mma16` writes the dense weight for cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.mma16 import DECODE, HALF, OFFSET
from lowbit.kernels.triton.common import SplitKOutputs, pdl, pdl_enter, splitk_last

NUM_SMS = 132
MAX_M = 64
# the first EARLY groups' weight loads of a warp go out before the PDL wait (H100,
# benchmarks/RESULTS.md run 11, one group: o at M = 1 8.2 → 7.6 µs, the other shapes 0.1-0.8 µs
# faster); 0, 1 or 2. Two groups (run 17, call 3, w4a16 decode tok/s, two pairs, one → two):
# batch 1 407 / 410 → 363 / 364, batch 16 4,612 / 4,570 → 4,554 / 4,602, batch 64 7,672 /
# 7,684 → 7,882 / 7,876 — so two only for 33-64 rows (EARLY_64)
EARLY = 1
EARLY_64 = 2
SMALL_N_E = 1  # column tiles a warp at M ≤ 8 for N ≤ 8192
# 9-32 rows of x (MT 2 or 4): programs of `warps` column units whose `kw` warps each take a
# slice of the split's groups, their sums meeting in the program, instead of four units of one
# warp. H100, benchmarks/RESULTS.md run 14, µs: M = 16 (1 unit × 2 slices; the kernel before
# this session → now) qkv 14.9 → 12.6, o 12.3 → 9.94, gate_up 46.8 → 38.4, down 24.9 → 21.1;
# M = 32 (2 × 2, against four units) qkv 24.2 → 14.6, o 22.5 → 13.4, down 47.2 → 37.4. At
# M ≤ 8 and M = 64 the slices measured slower. {}: none (an A/B switch)
SLICED = {2: {"warps": 1, "kw": 2}, 4: {"warps": 2, "kw": 2}}
# K of at least LONG_K (down_proj of an 8B, K = 14336) at M = 1: two column tiles a warp and
# up to 32 splits (64 waves), affordable since the finish sums one row (run 14, down at M = 1:
# 16.6 → 15.3 µs; the same on qkv 8.98 → 10.2, o 6.89 → 7.45)
LONG_K = 8192


@triton.constexpr_function
def _mma_asm(MT, FP16):
    """Inline PTX for one word: dequantize the A fragment (`DECODE`), then MT MMAs (one per 8
    rows of x). Operands: $0..$4MT-1 the accumulators out; then w, nz_lo, nz_hi (-(offset +
    zero) twice, of the fragment's rows g and g + 8), the 2 MT x fragment registers and the 4 MT
    accumulators in. The A fragment is q - z exactly; the group's scale multiplies the fp32
    result."""
    kind = "f16" if FP16 else "bf16"
    o = 4 * MT
    w, nzl, nzh = (f"${o + i}" for i in range(3))
    b0 = o + 3
    c0 = b0 + 2 * MT
    lines = ["{", ".reg .b32 r0, r1, r2, r3, t0, t1, t2, t3, m0, m1, m2, m3;"]
    for i in range(4):
        shift, mask, magic, mul = DECODE[bool(FP16)][i]
        src = w
        if shift:
            lines.append(f"shr.u32 t{i}, {w}, {shift};")
            src = f"t{i}"
        lines.append(f"lop3.b32 r{i}, {src}, {mask:#010x}, {magic:#010x}, 0xEA;")
        lines.append(f"mov.b32 m{i}, {HALF[mul][0 if FP16 else 1]};")
        lines.append(f"fma.rn.{kind}x2 r{i}, r{i}, m{i}, {nzl if i % 2 == 0 else nzh};")
    for t in range(MT):
        d = ", ".join(f"${4 * t + i}" for i in range(4))
        c = ", ".join(f"${c0 + 4 * t + i}" for i in range(4))
        b = f"${b0 + 2 * t}, ${b0 + 2 * t + 1}"
        lines.append(
            f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 "
            f"{{{d}}}, {{r0, r1, r2, r3}}, {{{b}}}, {{{c}}};"
        )
    lines.append("}")
    return "\n".join(lines)


@triton.constexpr_function
def _offset(FP16, hi):
    return OFFSET[bool(FP16)][hi]


@triton.constexpr_function
def _mma_constraints(MT):
    return ",".join(["=f"] * (4 * MT) + ["r"] * (3 + 2 * MT) + ["f"] * (4 * MT))


@triton.jit
def _pair(v):
    """16-bit floats v as int32 words holding v twice (a bf16x2 / f16x2 operand)."""
    bits = v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


@triton.constexpr_function
def _ld_asm(WORDS, STREAM):
    """PTX of a WORDS × 32-bit vector load (weights streamed: read once, no L1 allocation)."""
    hint = ".L1::no_allocate" if STREAM else ""
    vec = "" if WORDS == 1 else f".v{WORDS}"
    regs = ", ".join(f"${i}" for i in range(WORDS))
    return f"ld.global.nc{hint}{vec}.b32 {{{regs}}}, [${WORDS}];".replace("{$0}", "$0")


@triton.constexpr_function
def _ld_constraints(WORDS):
    return ",".join(["=r"] * WORDS + ["l"])


# Every tensor of the kernel is one element a lane (1-D, 32 × WARPS): a 1-D tensor of one
# element a thread has no other layout, which the MMA's fragments need; wider loads are these
# inline PTX vector loads with one output per register, never a Triton 2-D load whose layout
# might put another lane's values in a thread.
@triton.jit
def _ld(ptr, WORDS: tl.constexpr, STREAM: tl.constexpr):
    """A tuple of WORDS consecutive 32-bit words at each lane's (4 · WORDS)-byte aligned ptr."""
    return tl.inline_asm_elementwise(
        _ld_asm(WORDS, STREAM), _ld_constraints(WORDS), [ptr], dtype=(tl.int32,) * WORDS,
        is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _x_block(x_ptr, xz_ptr, g, c, blk, M, stride_xm, MT: tl.constexpr):
    """The x fragments of one 64-row block (4 k16 steps) for MT x tiles: lane 4 g + c reads
    x[8 t + g, 64 blk + 16 c : + 16] (32 bytes, two vector loads; lanes of rows ≥ M read 32
    zero bytes at xz_ptr instead); step s's fragment registers are words 2 s and 2 s + 1 of
    them. A tuple of 8 MT."""
    out = ()
    for t in tl.static_range(MT):
        m = t * 8 + g
        p = tl.where(m < M, x_ptr + m * (stride_xm // 2) + blk * 32 + c * 8, xz_ptr)
        lo = _ld(p, 4, False)
        hi = _ld(p + 4, 4, False)
        out = out + (lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3])
    return out


@triton.jit
def _mma_step(w, nzl, nzh, xb, s: tl.constexpr, acc, MT: tl.constexpr,
              FP16: tl.constexpr):  # fmt: skip
    """acc (tuple of 4 MT accumulators) += one word a lane times MT x tiles: k16 step s of the
    block whose fragments `_x_block` gave."""
    bs = ()
    for t in tl.static_range(MT):
        bs = bs + (xb[8 * t + 2 * s], xb[8 * t + 2 * s + 1])
    return tl.inline_asm_elementwise(
        _mma_asm(MT, FP16), _mma_constraints(MT), (w, nzl, nzh) + bs + acc,
        dtype=(tl.float32,) * (4 * MT), is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _fetch_w(w_base, s_ptr, z_ptr, grp, cg, j0, g, stride_sg, stride_zg, GROUP: tl.constexpr,
             HAS_ZERO: tl.constexpr, E: tl.constexpr):  # fmt: skip
    """One group's weight loads as one flat tuple: the words (block b, step s, word e at
    (4 b + s) E + e), then the raw scales of rows g and g + 8 and, with zero points, their
    packed words (`_sz` of them a word e, from 4 (GROUP // 64) E)."""
    words = ()
    for b in tl.static_range(GROUP // 64):
        for s in tl.static_range(4):
            words = words + _ld(w_base + ((grp * (GROUP // 64) + b) * 4 + s) * 128, E, True)
    for e in tl.static_range(E):
        n = cg * 64 + (j0 + e) * 16 + g  # the column of the fragment's row g (and + 8)
        s_row = s_ptr + grp * stride_sg
        words = words + (tl.load(s_row + n), tl.load(s_row + n + 8))
        if HAS_ZERO:
            z_row = z_ptr + grp * stride_zg
            words = words + (tl.load(z_row + n // 8), tl.load(z_row + n // 8 + 1))
    return words


@triton.constexpr_function
def _sz(HAS_ZERO):
    return 4 if HAS_ZERO else 2


@triton.jit
def _group(acc, wz, x_ptr, xz_ptr, grp, cg, j0, g, c, M, stride_xm, GROUP: tl.constexpr,
           HAS_ZERO: tl.constexpr, MT: tl.constexpr, E: tl.constexpr, WARPS: tl.constexpr,
           FP16: tl.constexpr, S_DTYPE: tl.constexpr):  # fmt: skip
    """acc + one group's scaled MMAs over its weight loads `wz` (`_fetch_w`)."""
    OFF_LO: tl.constexpr = _offset(FP16, 0)
    OFF_HI: tl.constexpr = _offset(FP16, 1)
    S0: tl.constexpr = 4 * (GROUP // 64) * E  # where the scales start in wz
    SZ: tl.constexpr = _sz(HAS_ZERO)
    s_lo = ()
    s_hi = ()
    nzl = ()
    nzh = ()
    for e in tl.static_range(E):
        n = cg * 64 + (j0 + e) * 16 + g
        s_lo = s_lo + (wz[S0 + SZ * e].to(tl.float32),)
        s_hi = s_hi + (wz[S0 + SZ * e + 1].to(tl.float32),)
        if HAS_ZERO:
            zl = ((wz[S0 + SZ * e + 2] >> (4 * (n % 8))) & 0xF).to(tl.float32)
            zh = ((wz[S0 + SZ * e + 3] >> (4 * (n % 8))) & 0xF).to(tl.float32)
        else:
            zl = tl.full([32 * WARPS], 8.0, tl.float32)
            zh = zl
        nzl = nzl + (_pair((-(OFF_LO + zl)).to(S_DTYPE)),)
        nzh = nzh + (_pair((-(OFF_HI + zh)).to(S_DTYPE)),)
    zero = tl.zeros([32 * WARPS], tl.float32)
    part = (zero,) * (4 * MT * E)  # this group's Σ (q - z) x
    for b in tl.static_range(GROUP // 64):
        xb = _x_block(x_ptr, xz_ptr, g, c, grp * (GROUP // 64) + b, M, stride_xm, MT)
        for s in tl.static_range(4):
            new = ()
            for e in tl.static_range(E):
                mine = ()
                for i in tl.static_range(4 * MT):
                    mine = mine + (part[4 * MT * e + i],)
                new = new + _mma_step(wz[(4 * b + s) * E + e], nzl[e], nzh[e], xb, s, mine, MT,
                                      FP16)  # fmt: skip
            part = new
    scaled = ()
    for r in tl.static_range(4 * MT * E):  # registers 0, 1: row g; 2, 3: row g + 8
        if (r % 4) < 2:
            scaled = scaled + (acc[r] + part[r] * s_lo[r // (4 * MT)],)
        else:
            scaled = scaled + (acc[r] + part[r] * s_hi[r // (4 * MT)],)
    return scaled


@triton.jit
def _wna16_mma_kernel(
    x_ptr, xz_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, y_ptr, cnt_ptr,
    M, N, K, groups_per_split,
    stride_xm, stride_sg, stride_zg, stride_os, stride_om, stride_ym,
    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, MT: tl.constexpr,
    E: tl.constexpr, WARPS: tl.constexpr, KW: tl.constexpr, FP16: tl.constexpr,
    EARLY: tl.constexpr, SPLIT: tl.constexpr, FUSED: tl.constexpr, FINISH_BIAS: tl.constexpr,
    FIN_M: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # A program is WARPS warps: CT units of E column tiles of 16 times KW slices of its split's
    # groups (warp w: unit w % CT, slice w // CT); the KW slices' sums meet in the program
    CT: tl.constexpr = WARPS // KW
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    idx = tl.arange(0, 32 * WARPS)  # element i: lane i % 32 of warp i // 32
    lane = idx % 32
    g = lane // 4
    c = lane % 4
    unit = pid_n * CT + (idx // 32) % CT
    cg = (unit * E) // 4
    j0 = (unit * E) % 4
    ksteps = K // 16
    w_base = qw_ptr + (cg * ksteps * 32 + lane) * 4 + j0
    per_warp = groups_per_split // KW
    if KW > 1:
        g_lo = pid_k * groups_per_split + (idx // 32 // CT) * per_warp
    else:
        g_lo = pid_k * groups_per_split
    # Weights are never written by a kernel, so with PDL the first EARLY groups' weight loads
    # (0, 1 or 2, at most the warp's) may go out before the wait for the kernel x comes from
    if EARLY >= 1:
        first = _fetch_w(w_base, s_ptr, z_ptr, g_lo, cg, j0, g, stride_sg, stride_zg, GROUP,
                         HAS_ZERO, E)  # fmt: skip
    if EARLY >= 2:
        second = _fetch_w(w_base, s_ptr, z_ptr, g_lo + 1, cg, j0, g, stride_sg, stride_zg,
                          GROUP, HAS_ZERO, E)  # fmt: skip
    pdl_enter(PDL)
    zero = tl.zeros([32 * WARPS], tl.float32)
    acc = (zero,) * (4 * MT * E)  # word e's tile t register i at 4 (MT e + t) + i
    S_DTYPE: tl.constexpr = s_ptr.dtype.element_ty
    if EARLY >= 1:
        acc = _group(acc, first, x_ptr, xz_ptr, g_lo, cg, j0, g, c, M, stride_xm, GROUP,
                     HAS_ZERO, MT, E, WARPS, FP16, S_DTYPE)  # fmt: skip
    if EARLY >= 2:
        acc = _group(acc, second, x_ptr, xz_ptr, g_lo + 1, cg, j0, g, c, M, stride_xm, GROUP,
                     HAS_ZERO, MT, E, WARPS, FP16, S_DTYPE)  # fmt: skip
    # the loads are inline PTX, which Triton's pipeliner does not prefetch (carrying the next
    # group's loads through the loop by hand measured slower: benchmarks/RESULTS.md run 11)
    for i in range(EARLY, per_warp):
        grp = g_lo + i
        wz = _fetch_w(w_base, s_ptr, z_ptr, grp, cg, j0, g, stride_sg, stride_zg, GROUP,
                      HAS_ZERO, E)  # fmt: skip
        acc = _group(acc, wz, x_ptr, xz_ptr, grp, cg, j0, g, c, M, stride_xm, GROUP, HAS_ZERO,
                     MT, E, WARPS, FP16, S_DTYPE)  # fmt: skip
    if KW > 1:  # sum the K slices: element (slice, unit, lane) → (unit, lane)
        red = ()
        for r in tl.static_range(4 * MT * E):
            red = red + (tl.sum(tl.reshape(acc[r], (KW, 32 * CT)), axis=0),)
        acc = red
        idx = tl.arange(0, 32 * CT)
        lane = idx % 32
        g = lane // 4
        c = lane % 4
        unit = pid_n * CT + idx // 32
        cg = (unit * E) // 4
        j0 = (unit * E) % 4
    # word e's tile t register i: column n (+ 8 for i ≥ 2), x row 8 t + 2 c + i % 2
    for r in tl.static_range(4 * MT * E):
        e = r // (4 * MT)
        t = (r // 4) % MT
        i = r % 4
        m = t * 8 + 2 * c + (i % 2)
        n = cg * 64 + (j0 + e) * 16 + g + 8 * (i // 2)
        v = acc[r]
        if HAS_BIAS:
            v += tl.load(bias_ptr + n).to(tl.float32)
        ptrs = out_ptr + pid_k * stride_os + m * stride_om + n
        tl.store(ptrs, v.to(out_ptr.dtype.element_ty), mask=m < M)
    # the tile's last split sums the partials into y: FIN_M = next_pow2(M) rows of them, not the
    # x tiles' 8 · MT — at M = 1 one pass instead of two on o and down (16 splits; H100,
    # benchmarks/RESULTS.md run 14, µs at M = 1 before → after: o 7.53 → 6.93, down 17.0 → 16.5)
    if FUSED:
        splitk_last(out_ptr, y_ptr, bias_ptr, cnt_ptr, pid_n, M, N, 0, pid_n * CT * E * 16,
                    stride_os, stride_om, stride_ym, SPLIT, FIN_M, CT * E * 16, FINISH_BIAS,
                    WARPS)  # fmt: skip


_ZEROS: dict[str, Tensor] = {}


def _zeros(device: torch.device) -> Tensor:
    """32 zero bytes a device: what the lanes of x rows past M read. Allocated on the first
    eager call (the engine runs every batch size eagerly before capturing it); allocated inside
    a CUDA-graph capture it would live in the graph's pool, reusable by others, so that is
    refused."""
    z = _ZEROS.get(str(device))
    if z is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "wna16_mma's first call on this device is inside a CUDA-graph capture; run it "
                "once eagerly before capturing"
            )
        z = _ZEROS[str(device)] = torch.zeros(8, dtype=torch.int32, device=device)
    return z


def _config(M: int, N: int, K: int, G: int, **over) -> dict[str, int]:
    """Launch config: x tiles `mt` (8 rows each), words a lane `e` (column tiles a warp),
    `warps` column units a program (e column tiles each; they share the split-K finish), `kw`
    warps a unit (each a slice of the split's groups, summed in the program; the program has
    warps · kw warps), `waves` of warps an SM the K splits aim at (whole groups, dividing
    evenly, at most `max_split`; with kw > 1 a split is kw slices of `gpw` groups, 0: as few
    splits as max_split allows)."""
    mt = triton.cdiv(M, 8)
    mt = 1 << (mt - 1).bit_length()
    # H100 probes (benchmarks/RESULTS.md run 10): one-warp programs of 2 column tiles, 32
    # waves, up to 16 splits at M ≤ 8 (µs: qkv 10.3, o 8.3, gate_up 27.9, down 18.7, against
    # the GEMV's 12.8 / 11.7 / 33.4 / 22.1); at larger M 4-warp programs and at most 4 splits:
    # the finish (one program summing every split's M × 128 partials) grows with the splits
    # (o at M = 16: 12.5 µs with ≤ 4 splits, 19.9 with ≤ 16)
    if M == 1 and K >= LONG_K:
        c = {"e": 2, "warps": 1, "waves": 64, "max_split": 32, "early": EARLY}
    elif mt == 1:  # one column tile a warp up to N = 8192 (µs, e = 1 vs 2, run 11: qkv 9.25
        # vs 9.85, o 7.6 vs 7.74, down 17.2 vs 17.9; gate_up 31.6 vs 26.9)
        e = SMALL_N_E if N <= 8192 else 2
        c = {"e": e, "warps": 1, "waves": 32, "max_split": 16, "early": EARLY}
    else:  # 8 splits for long K (down at M = 16: 31.6 → 25.0 µs; 4 → 8 was slower on o)
        c = {"e": 2 if mt == 2 else 8 // mt, "warps": 4, "waves": 8,
             "max_split": 8 if K >= 8192 else 4,
             "early": EARLY_64 if mt == 8 else EARLY}  # fmt: skip
        c.update(SLICED.get(mt, {}))
    c = {"kw": 1, "gpw": 0, **c}
    if set(over) - set(c):
        raise ValueError(
            f"unknown wna16_mma config keys {sorted(set(over) - set(c))}; use {list(c)}"
        )
    c.update(over)
    c["mt"] = mt
    units = N // (16 * c["e"])
    while units % c["warps"]:  # every warp of a program has a unit
        c["warps"] //= 2
    groups = K // G
    while groups % c["kw"]:
        c["kw"] //= 2
    if c["kw"] > 1:
        per = c["kw"] * (c["gpw"] or max(1, groups // c["kw"] // c["max_split"]))
        while groups % per:
            per += c["kw"]
        c["per_split"] = per
        return c
    want = max(1, min(c["max_split"], c["waves"] * NUM_SMS // units))
    per = max(1, triton.cdiv(groups, want))
    while groups % per:
        per += 1
    c["per_split"] = per
    return c


def checked_mma16_rows(x, qmma, scales, qzeros, group_size, bias, perm):
    """Assert the `mma16` layout's argument shapes; x as contiguous rows (M, K) in act order.

    Returns (x2, N, K, G). Shared by this kernel and `wna16_mma_tiled`."""
    ncg, nks = qmma.shape[:2]
    N, K = ncg * 64, nks * 16
    G = K if group_size in (-1, 0) else group_size
    assert qmma.shape == (ncg, nks, 32, 4) and qmma.dtype == torch.int32 and qmma.is_contiguous()
    assert x.shape[-1] == K and x.dtype in (torch.bfloat16, torch.float16), (x.shape, x.dtype)
    assert scales.shape == (K // G, N) and scales.dtype == x.dtype and scales.stride(1) == 1
    assert qzeros is None or (qzeros.shape == (K // G, N // 8) and qzeros.stride(1) == 1)
    assert bias is None or bias.shape == (N,), bias.shape
    assert G % 64 == 0 and K % G == 0, (G, K)
    x2 = x.reshape(-1, K)
    if perm is not None:
        x2 = x2[:, perm]
    return x2.contiguous(), N, K, G


def wna16_mma_gemm(
    x: Tensor,
    qmma: Tensor,
    scales: Tensor,
    qzeros: Tensor | None,
    group_size: int,
    bias: Tensor | None = None,
    perm: Tensor | None = None,
    config: dict | None = None,
) -> Tensor:
    """y = x @ dequant(W)^T for up to MAX_M rows of bf16/fp16 x and an int4 weight in the
    `mma16` layout (`pack_mma16`); scales (K/G, N), qzeros (K/G, N/8) or None (symmetric, zero
    8), perm (act-order) as in `wna16_gemm.py`. `config` overrides `_config` (e, warps, waves,
    max_split) for tuning."""
    x2, N, K, G = checked_mma16_rows(x, qmma, scales, qzeros, group_size, bias, perm)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    assert M <= MAX_M, f"M={M}: wna16_mma_gemm is the small-M path (M ≤ {MAX_M})"
    cfg = _config(M, N, K, G, **(config or {}))
    e, mt, warps, kw = cfg["e"], cfg["mt"], cfg["warps"], cfg["kw"]
    split = (K // G) // cfg["per_split"]
    grid = (N // (16 * e * warps), split)
    o = SplitKOutputs(split, M, N, x.dtype, x.device, grid[0])
    dummy = qmma
    _wna16_mma_kernel[grid](
        x2.view(torch.int32), _zeros(x.device), qmma, scales,
        qzeros if qzeros is not None else dummy,
        bias if bias is not None else dummy, o.part, o.out, o.counters,
        M, N, K, cfg["per_split"],
        x2.stride(0), scales.stride(0), qzeros.stride(0) if qzeros is not None else 0,
        o.part.stride(0), o.part.stride(1), o.out.stride(0),
        GROUP=G, HAS_ZERO=qzeros is not None, HAS_BIAS=bias is not None and split == 1,
        MT=mt, E=e, WARPS=warps * kw, KW=kw, FP16=x.dtype == torch.float16,
        EARLY=min(int(cfg["early"]), cfg["per_split"] // kw), SPLIT=split, FUSED=o.fused,
        FINISH_BIAS=bias is not None,
        FIN_M=triton.next_power_of_2(M), **pdl(x.device), num_warps=warps * kw,
    )  # fmt: skip
    return o.result(bias).reshape(*x.shape[:-1], N)


@triton.jit
def _dequant_mma16_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, K, stride_sg, stride_zg, stride_on,
                          GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):  # fmt: skip
    """One 64 × 64 tile of W (column group cg, 64-row block blk) from its 512 words (2 KiB,
    contiguous): decode all 4096 codes in the layout's order (s, g, c, j, kl, kh, h), permute
    to (j, h, g | c, s, kh, kl) = (n, k) and store the tile row by row."""
    cg = tl.program_id(0)
    blk = tl.program_id(1)
    ws = tl.arange(0, 4)[:, None, None, None]  # k16 step within the block
    wl = tl.arange(0, 32)[None, :, None, None]  # lane
    wj = tl.arange(0, 4)[None, None, :, None]  # column tile
    nib = tl.arange(0, 8)[None, None, None, :]
    word = tl.load(qw_ptr + ((cg * (K // 16) + blk * 4 + ws) * 32 + wl) * 4 + wj)
    q = (word >> (4 * nib)) & 0xF  # (4 s, 32 lane, 4 j, 8 nibble)
    h = nib % 2
    n = cg * 64 + wj * 16 + 8 * h + wl // 4  # (4, 32, 4, 8)
    grp = (blk * 64) // GROUP
    s = tl.load(s_ptr + grp * stride_sg + n).to(tl.float32)
    if HAS_ZERO:
        z = ((tl.load(z_ptr + grp * stride_zg + n // 8) >> (4 * (n % 8))) & 0xF).to(tl.float32)
    else:
        z = 8.0
    v = ((q.to(tl.float32) - z) * s).to(out_ptr.dtype.element_ty)
    # (s, g, c, j, kl, kh, h) → (j, h, g, c, s, kh, kl)
    v = v.reshape(4, 8, 4, 4, 2, 2, 2)
    v = tl.permute(v, (3, 6, 1, 2, 0, 5, 4)).reshape(64, 64)
    rn = cg * 64 + tl.arange(0, 64)
    rk = blk * 64 + tl.arange(0, 64)
    tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :], v)


def dequant_mma16(qmma: Tensor, scales: Tensor, qzeros: Tensor | None, group_size: int) -> Tensor:
    """The (N, K) weight in the scales' dtype from the `mma16` layout (the large-M path:
    dequantize once, then a dense GEMM)."""
    ncg, nks = qmma.shape[:2]
    N, K = ncg * 64, nks * 16
    G = K if group_size in (-1, 0) else group_size
    out = torch.empty(N, K, dtype=scales.dtype, device=qmma.device)
    _dequant_mma16_kernel[(ncg, K // 64)](
        qmma, scales, qzeros if qzeros is not None else qmma, out, K, scales.stride(0),
        qzeros.stride(0) if qzeros is not None else 0, out.stride(0), GROUP=G,
        HAS_ZERO=qzeros is not None, num_warps=4,
    )  # fmt: skip
    return out
