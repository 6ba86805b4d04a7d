"""Rotary embedding (rotate-half convention) of q and k in one launch, from cos/sin tables.

Matches lowbit.layers.rotary.RotaryEmbedding: cos/sin (P, D/2) float32 tables, cast to the
compute dtype, x·cos + rotate_half(x)·sin. Programs 0…H-1 of axis 1 rotate q's heads, the rest k's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.triton.common import pdl, pdl_enter


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_c, H: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    if h < H:
        src = q_ptr + t * stride_qt + h * stride_qh
        dst = qo_ptr + t * stride_qot + h * stride_qoh
    else:
        src = k_ptr + t * stride_kt + (h - H) * stride_kh
        dst = ko_ptr + t * stride_kot + (h - H) * stride_koh
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    pos = tl.load(pos_ptr + t).to(tl.int64)
    x1 = tl.load(src + i, mask=mask, other=0.0)
    x2 = tl.load(src + HALF + i, mask=mask, other=0.0)
    c = tl.load(cos_ptr + pos * stride_c + i, mask=mask, other=0.0).to(x1.dtype)
    s = tl.load(sin_ptr + pos * stride_c + i, mask=mask, other=0.0).to(x1.dtype)
    tl.store(dst + i, (x1 * c - x2 * s).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF + i, (x2 * c + x1 * s).to(dst.dtype.element_ty), mask=mask)


def rotary(
    positions: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """q (T, H, D), k (T, Hkv, D) rotated at positions (T,) with cos/sin tables (P, D/2).

    q, k      any strides with a unit last stride (views into the fused qkv output)
    returns   new contiguous (T, H, D) and (T, Hkv, D)
    """
    T, H, D = q.shape
    Hkv = k.shape[1]
    assert k.shape == (T, Hkv, D), (q.shape, k.shape)
    assert positions.shape == (T,), positions.shape
    assert cos.shape == sin.shape and cos.shape[1] == D // 2 and cos.stride(1) == 1, cos.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1
    qo = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    ko = torch.empty(T, Hkv, D, dtype=k.dtype, device=k.device)
    if T:
        _rotary_kernel[(T, H + Hkv)](
            q, k, qo, ko, positions, cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
            cos.stride(0), H=H, HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2),
            **pdl(q.device), num_warps=1,
        )  # fmt: skip
    return qo, ko
