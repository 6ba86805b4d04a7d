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
def pdl_enter(PDL: tl.constexpr):
    """The first statement of every kernel launched with `pdl(...)` (nothing before it may read
    or write memory): wait until the previous kernel in the stream has finished and its writes
    are visible, then let the next kernel launch (it will wait here in turn), so at most two
    kernels overlap. A no-op when PDL is off."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
