"""Rotary embedding (rotate-half convention) of q and k in one launch, from cos/sin tables.

Matches lowbit.layers.rotary.RotaryEmbedding: cos/sin (P, D/2) float32 tables, cast to the
compute dtype, x·cos + rotate_half(x)·sin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rotary_kernel(
    x_ptr, out_ptr, pos_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_ot, stride_oh,
    stride_c, HALF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    base = x_ptr + t * stride_xt + h * stride_xh
    x1 = tl.load(base + i, mask=mask, other=0.0)
    x2 = tl.load(base + HALF + i, mask=mask, other=0.0)
    c = tl.load(cos_ptr + pos * stride_c + i, mask=mask, other=0.0).to(x1.dtype)
    s = tl.load(sin_ptr + pos * stride_c + i, mask=mask, other=0.0).to(x1.dtype)
    o = out_ptr + t * stride_ot + h * stride_oh
    tl.store(o + i, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o + HALF + i, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """One (T, heads, D) tensor rotated into a new contiguous tensor."""
    T, Hx, D = x.shape
    out = torch.empty(T, Hx, D, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    _rotary_kernel[(T, Hx)](
        x, out, positions, cos, sin, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        cos.stride(0), HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2), num_warps=1,
    )  # fmt: skip
    return out


def rotary(
    positions: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """q (T, H, D), k (T, Hkv, D) rotated at positions (T,) with cos/sin tables (P, D/2)."""
    T, H, D = q.shape
    assert k.shape[0] == T and k.shape[2] == D, (q.shape, k.shape)
    assert positions.shape == (T,), positions.shape
    assert cos.shape == sin.shape and cos.shape[1] == D // 2 and cos.stride(1) == 1, cos.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1
    return _rotate(q, positions, cos, sin), _rotate(k, positions, cos, sin)
