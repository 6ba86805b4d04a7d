"""Greedy sampling's argmax over a few rows of float logits, split across programs.

torch's argmax of one 128,256-wide row took 27 µs of a 2.5 ms batch-1 decode step on the H100
(benchmarks/RESULTS.md run 11 profile): one row is reduced by few blocks. Here each row is cut
into BLOCK-wide chunks, one program each; a program stores its chunk's max and first index,
and the last of a row's programs to arrive (`common.arrive_last`) picks the first chunk holding
the row's max. Ties go to the lowest index, as torch's argmax; NaN is not ordered (logits have
none: the sampler's inputs are finite or -inf).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.triton.common import (
    arrive_last,
    pdl,
    pdl_enter,
    reset_arrivals,
    splitk_counters,
)

BLOCK = 4096


@triton.jit
def _argmax_kernel(
    x_ptr, pmax_ptr, pidx_ptr, out_ptr, cnt_ptr, V, stride_x,
    CHUNKS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    row = tl.program_id(0)
    ch = tl.program_id(1)
    cols = ch * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=-float("inf"))
    x = x.to(tl.float32)
    # the first max: a real column even in a chunk of -inf (padding comes after the row's end)
    best, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(pmax_ptr + row * CHUNKS + ch, best)
    tl.store(pidx_ptr + row * CHUNKS + ch, ch * BLOCK + at)
    if arrive_last(cnt_ptr, row, CHUNKS):
        CP: tl.constexpr = triton.next_power_of_2(CHUNKS)
        r = tl.arange(0, CP)
        pm = tl.load(pmax_ptr + row * CHUNKS + r, mask=r < CHUNKS, other=-float("inf"),
                     cache_modifier=".cg")  # fmt: skip
        pi = tl.load(pidx_ptr + row * CHUNKS + r, mask=r < CHUNKS, other=0, cache_modifier=".cg")
        _, first = tl.max(pm, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(out_ptr + row, tl.sum(tl.where(r == first, pi, 0)).to(tl.int64))
        reset_arrivals(cnt_ptr, row)


def argmax(logits: Tensor) -> Tensor | None:
    """(B, V) float logits (unit column stride) → (B,) int64 index of each row's first max; None
    where the split kernel cannot run here (its arrival counters would be allocated inside a
    CUDA-graph capture): the caller then takes torch's argmax."""
    B, V = logits.shape
    assert logits.stride(-1) == 1 and V > 0, (logits.shape, logits.stride())
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    counters = splitk_counters(logits.device, B)
    if counters is None:
        return None
    chunks = triton.cdiv(V, BLOCK)
    pmax = torch.empty(B, chunks, dtype=torch.float32, device=logits.device)
    pidx = torch.empty(B, chunks, dtype=torch.int32, device=logits.device)
    _argmax_kernel[(B, chunks)](
        logits, pmax, pidx, out, counters, V, logits.stride(0), CHUNKS=chunks, BLOCK=BLOCK,
        **pdl(logits.device), num_warps=4,
    )  # fmt: skip
    return out
