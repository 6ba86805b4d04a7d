"""Pieces the Triton GEMM/GEMV kernels share: split-K partial buffers and their reduction, and
the grouped ordering of output tiles."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.dispatch import capability

REDUCE_BLOCK = 1024
# Inline PTX where the compiler's own lowering is slower; Triton's interpreter (CPU debugging,
# `TRITON_INTERPRET=1`) runs no PTX, so it takes the plain expression with the same result.
USE_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")

# Programmatic dependent launch (Hopper+): a kernel launched with `pdl(device)` is scheduled
# while the kernel before it in the stream still runs, and waits in `pdl_enter` until that
# kernel's writes are visible, so the launch gap between consecutive small kernels (batch-1
# decode: ~15 a layer) is hidden. LOWBIT_PDL=0 turns it off; benchmarks flip PDL_ENABLED.
PDL_ENABLED = os.environ.get("LOWBIT_PDL", "1") != "0"


def pdl(device: torch.device) -> dict[str, bool]:
    """Launch keywords of a kernel that starts with `pdl_enter(PDL)`: its PDL flag and Triton's
    `launch_pdl` option, both on for CUDA devices of compute capability ≥ 9.0 (sm_90's
    griddepcontrol) unless PDL is turned off or Triton is interpreting."""
    on = bool(
        PDL_ENABLED
        and USE_PTX.value
        and device.type == "cuda"
        and capability(torch.cuda.current_device() if device.index is None else device.index)
        >= (9, 0)
    )
    return {"PDL": on, "launch_pdl": on}


def splitk_buffer(split: int, M: int, N: int, dtype: torch.dtype, device) -> Tensor:
    """Where `split` programs along K write: (1, M, N) in the output dtype when K is not split
    (the kernel writes the result, bias included), else (split, M, N) fp32 partials."""
    if split == 1:
        return torch.empty(1, M, N, dtype=dtype, device=device)
    return torch.empty(split, M, N, dtype=torch.float32, device=device)


def splitk_finish(out: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """(M, N) result of a `splitk_buffer`: as written when unsplit (the kernel added the bias),
    else the partials summed in fp32 (+ bias) and cast once, in one launch."""
    split, M, N = out.shape
    if split == 1:
        return out[0]
    y = torch.empty(M, N, dtype=dtype, device=out.device)
    _splitk_reduce_kernel[(triton.cdiv(M * N, REDUCE_BLOCK),)](
        out, bias if bias is not None else out, y, M * N, N, split, out.stride(0),
        HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, **pdl(out.device), num_warps=4,
    )  # fmt: skip
    return y


# In-kernel split-K finish: the last program of a tile to arrive sums the tile's partials
# (`splitk_last`), so a split GEMV is one launch instead of two. LOWBIT_FUSED_SPLITK=0 (or
# FUSED_SPLITK = False) restores the separate reduce launch (`splitk_finish`).
FUSED_SPLITK = os.environ.get("LOWBIT_FUSED_SPLITK", "1") != "0"
_COUNTERS: dict[str, list[Tensor]] = {}
MIN_COUNTERS = 1 << 16


def splitk_counters(device: torch.device, tiles: int) -> Tensor | None:
    """At least `tiles` int32 arrival counters for `splitk_last`, zero between launches (each
    tile's last program puts its counter back), one set per device: kernels that use them must
    not run concurrently on one device (lowbit runs its forward passes on one stream).

    None when the fused finish is off, or when the counters would have to be allocated during
    CUDA-graph capture (the caller then takes the two-launch path). Buffers are never freed:
    captured graphs keep their addresses."""
    if not FUSED_SPLITK:
        return None
    bufs = _COUNTERS.setdefault(str(device), [])
    if not bufs or bufs[-1].numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        bufs.append(torch.zeros(max(tiles, MIN_COUNTERS), dtype=torch.int32, device=device))
    return bufs[-1]


class SplitKOutputs:
    """Where one split-K launch writes, and how its result is read.

    `part`: (1, M, N) in the output dtype when K is not split (the kernel writes the result,
    bias included), else (split, M, N) fp32 partials; `out`: the (M, N) result; `fused`: the
    tile's last split sums the partials into `out` in the kernel (`splitk_last` with
    `counters`), else `result` sums them in a second launch. `counters` is a placeholder
    (`part`, never read) when not fused, so it can always be passed to the kernel."""

    def __init__(self, split: int, M: int, N: int, dtype: torch.dtype, device, tiles: int):
        self.part = splitk_buffer(split, M, N, dtype, device)
        counters = splitk_counters(device, tiles) if split > 1 else None
        self.fused = counters is not None
        self.counters = counters if self.fused else self.part
        self.out = torch.empty(M, N, dtype=dtype, device=device) if self.fused else self.part[0]

    def result(self, bias: Tensor | None) -> Tensor:
        """The (M, N) result (the partials summed, + bias, when the kernel did not)."""
        if self.fused or self.part.shape[0] == 1:
            return self.out
        return splitk_finish(self.part, bias, self.out.dtype)


@triton.jit
def arrive_last(cnt_ptr, tile, count):
    """Count this program's arrival at `tile` and say whether it is the last of `count` (a
    constant or a runtime value) to arrive (the semaphore pattern: a CTA barrier after the
    program's stores, then one acq_rel atomic at GPU scope: release for this CTA's stores,
    acquire for the others'). The last one must `reset_arrivals` when done, so the counter is
    0 for the next launch."""
    tl.debug_barrier()
    return tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu") == count - 1


@triton.jit
def reset_arrivals(cnt_ptr, tile):
    """Put `tile`'s arrival counter back to 0 (by the last program, after its work)."""
    tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.constexpr_function
def _finish_cols(split_p2, rows, cols, warps):
    """Columns the last program sums at a time: ≤ 32 partial values a thread in registers."""
    c = cols
    while c > 1 and split_p2 * rows * c > 32 * 32 * warps:
        c //= 2
    return c


@triton.jit
def splitk_last(part_ptr, out_ptr, bias_ptr, cnt_ptr, tile, M, N, row0, col0,
                stride_ps, stride_pm, stride_om, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                WARPS: tl.constexpr):  # fmt: skip
    """The end of every program of a split-K kernel, after it stored its fp32 partial block
    part[pid_k, row0 : row0 + BLOCK_M, col0 : col0 + BLOCK_N]: the program counts its arrival
    at the tile's counter; the last of the SPLIT to arrive sums the tile's partials in split
    order (deterministic), adds the bias, writes out[rows, cols] and puts the counter back to 0
    (`arrive_last`). The partials are read at L2 (.cg), never from a stale L1 line."""
    if arrive_last(cnt_ptr, tile, SPLIT):
        SP: tl.constexpr = triton.next_power_of_2(SPLIT)
        CB: tl.constexpr = _finish_cols(SP, BLOCK_M, BLOCK_N, WARPS)
        rs = tl.arange(0, SP)
        rm = row0 + tl.arange(0, BLOCK_M)
        for c in tl.static_range(BLOCK_N // CB):
            rn = col0 + c * CB + tl.arange(0, CB)
            mn = (rm < M)[:, None] & (rn < N)[None, :]
            ptrs = (
                part_ptr
                + rs[:, None, None] * stride_ps
                + (rm[:, None] * stride_pm + rn[None, :])[None, :, :]
            )
            p = tl.load(ptrs, mask=(rs < SPLIT)[:, None, None] & mn[None, :, :], other=0.0,
                        cache_modifier=".cg")  # fmt: skip
            y = tl.sum(p, axis=0)
            if HAS_BIAS:
                y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            o = out_ptr + rm[:, None] * stride_om + rn[None, :]
            tl.store(o, y.to(out_ptr.dtype.element_ty), mask=mn)
        reset_arrivals(cnt_ptr, tile)


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, MN, N, SPLIT, stride_s,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                          PDL: tl.constexpr):  # fmt: skip
    pdl_enter(PDL)
    # out (M, N) = Σ_s part[s] (+ bias), fp32 sums, cast once.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * stride_s + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):  # fmt: skip
    """(pid_m, pid_n) of program `pid`: GROUP_M row tiles sweep N together, so a weight tile
    loaded for one of them is still in L2 for the others."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def and_or_f32(w, MASK: tl.constexpr, MAGIC: tl.constexpr):
    """The int32 words w as fp32 bit patterns (w & MASK) | MAGIC, in one LOP3 on the GPU: ptxas
    leaves the AND and the OR as two instructions, and this is the whole body of a code's
    integer → float step in the dequantizing loops."""
    if USE_PTX:
        return tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xEA;",  # 0xEA = (a & b) | c
            "=r,r,r,r",
            [w, tl.full(w.shape, MASK, tl.int32), tl.full(w.shape, MAGIC, tl.int32)],
            dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
    else:
        return ((w & MASK) | MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def prefetch_l2(ptrs, on):
    """Ask L2 for the 128-byte line at each pointer where `on` (a hint nothing waits on). What a
    kernel may do before its PDL wait with memory no kernel before it writes, so those bytes
    come from HBM while the previous kernel still runs. A no-op in the interpreter."""
    if USE_PTX:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
            "=r,l,r", [ptrs, on.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """The first statement of every kernel launched with `pdl(...)` (before it a kernel may
    only read what no kernel writes, such as weights, and write nothing): wait until the
    previous kernel in the stream has finished and its writes are visible, then let the next
    kernel launch (it will wait here in turn), so at most two kernels overlap. A no-op when
    PDL is off."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
