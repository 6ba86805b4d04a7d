"""SwiGLU activation: silu(gate) · up from the fused gate_up output, in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.triton.common import pdl, pdl_enter

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(
    x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    pdl_enter(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # torch's silu rounds to the input dtype
    tl.store(out_ptr + row * stride_o + cols, act * up, mask=mask)


def silu_mul(x: Tensor) -> Tensor:
    """x (…, 2·I) = [gate | up] → silu(gate) · up (…, I)."""
    two_i = x.shape[-1]
    assert two_i % 2 == 0, x.shape
    I = two_i // 2  # noqa: E741
    x2 = x.reshape(-1, two_i)
    assert x2.stride(-1) == 1, x.stride()
    M = x2.shape[0]
    out = torch.empty(M, I, dtype=x.dtype, device=x.device)
    if M:
        _silu_mul_kernel[(M, triton.cdiv(I, BLOCK))](
            x2, out, I, x2.stride(0), out.stride(0), BLOCK=BLOCK, **pdl(x2.device), num_warps=4
        )
    return out.reshape(*x.shape[:-1], I)
