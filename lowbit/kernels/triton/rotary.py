"""Rotary embedding (rotate-half convention) of q and k in one launch, from cos/sin tables; in
the model's attention the same launch writes the rotated keys and the values at their cache
slots (fp8 caches as x / scale, saturated as `KVCache.write` does; slot < 0 writes nothing).

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
    q_ptr, k_ptr, v_ptr, qo_ptr, ko_ptr, vo_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr,
    inv_k_scale, inv_v_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qot, stride_qoh,
    stride_kot, stride_koh, stride_c, H: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
    STORE: tl.constexpr, IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """STORE: ko/vo are the k/v caches (slot-major; stride_kot the slot stride), rows of slot
    < 0 (CUDA-graph padding) write nothing; else ko is the rotated k and v is not read."""
    pdl_enter(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    if h < H:
        y1, y2 = _rotate(q_ptr + t * stride_qt + h * stride_qh, pos_ptr, cos_ptr, sin_ptr, t,
                         stride_c, i, mask, HALF)  # fmt: skip
        _store_half(qo_ptr + t * stride_qot + h * stride_qoh, y1, y2, i, mask, 1.0, False,
                    FP8_MAX, HALF)  # fmt: skip
    else:
        j = h - H
        if STORE:  # pointers of different dtypes (fp8 caches) stay in their own branch
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if slot >= 0:
                y1, y2 = _rotate(k_ptr + t * stride_kt + j * stride_kh, pos_ptr, cos_ptr,
                                 sin_ptr, t, stride_c, i, mask, HALF)  # fmt: skip
                dst = slot * stride_kot + j * stride_koh
                _store_half(ko_ptr + dst, y1, y2, i, mask, inv_k_scale, IS_FP8, FP8_MAX, HALF)
                vsrc = v_ptr + t * stride_vt + j * stride_vh
                v1 = tl.load(vsrc + i, mask=mask)
                v2 = tl.load(vsrc + HALF + i, mask=mask)
                _store_half(vo_ptr + dst, v1, v2, i, mask, inv_v_scale, IS_FP8, FP8_MAX, HALF)
        else:
            y1, y2 = _rotate(k_ptr + t * stride_kt + j * stride_kh, pos_ptr, cos_ptr, sin_ptr,
                             t, stride_c, i, mask, HALF)  # fmt: skip
            _store_half(ko_ptr + t * stride_kot + j * stride_koh, y1, y2, i, mask, 1.0, False,
                        FP8_MAX, HALF)  # fmt: skip


@triton.jit
def _rotate(src, pos_ptr, cos_ptr, sin_ptr, t, stride_c, i, mask, HALF: tl.constexpr):
    """The two rotated halves of the head at src for token t's position."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    x1 = tl.load(src + i, mask=mask, other=0.0)
    x2 = tl.load(src + HALF + i, mask=mask, other=0.0)
    c = tl.load(cos_ptr + pos * stride_c + i, mask=mask, other=0.0).to(x1.dtype)
    s = tl.load(sin_ptr + pos * stride_c + i, mask=mask, other=0.0).to(x1.dtype)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _store_half(dst, x1, x2, i, mask, inv_scale, IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr,
                HALF: tl.constexpr):  # fmt: skip
    """Halves x1, x2 of a head at dst: fp8 as x / scale saturated to the format's largest
    value."""
    if IS_FP8:
        x1 = tl.clamp(x1.to(tl.float32) * inv_scale, -FP8_MAX, FP8_MAX)
        x2 = tl.clamp(x2.to(tl.float32) * inv_scale, -FP8_MAX, FP8_MAX)
    tl.store(dst + i, x1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF + i, x2.to(dst.dtype.element_ty), mask=mask)


def _check(positions: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Assert the shapes and strides both entry points share."""
    T, H, D = q.shape
    assert k.shape == (T, k.shape[1], D), (q.shape, k.shape)
    assert positions.shape == (T,), positions.shape
    assert cos.shape == sin.shape and cos.shape[1] == D // 2 and cos.stride(1) == 1, cos.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1


def rotary(
    positions: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """q (T, H, D), k (T, Hkv, D) rotated at positions (T,) with cos/sin tables (P, D/2).

    q, k      any strides with a unit last stride (views into the fused qkv output)
    returns   new contiguous (T, H, D) and (T, Hkv, D)
    """
    _check(positions, q, k, cos, sin)
    T, H, D = q.shape
    qo = torch.empty_like(q, memory_format=torch.contiguous_format)
    ko = torch.empty_like(k, memory_format=torch.contiguous_format)
    _launch(positions, q, k, k, qo, ko, ko, positions, cos, sin, 1.0, 1.0, store=False)
    return qo, ko


def rotary_kv_store(
    positions: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> Tensor:
    """`rotary` of q and k, and the rotated k and v stored in the KV caches, in one launch:
    returns the rotated q (T, H, D); k (T, Hkv, D) rotated and v land at `slots` (< 0: skipped)
    of the caches (S, Hkv, D), fp8 caches as x / scale saturated (as `KVCache.write`)."""
    _check(positions, q, k, cos, sin)
    T, Hkv, D = k.shape
    assert v.shape == k.shape and v.stride(-1) == 1, (k.shape, v.shape)
    assert k_cache.shape[1:] == (Hkv, D) and v_cache.shape == k_cache.shape, k_cache.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert slots.shape == (T,), slots.shape
    qo = torch.empty_like(q, memory_format=torch.contiguous_format)
    _launch(positions, q, k, v, qo, k_cache, v_cache, slots, cos, sin, 1.0 / k_scale,
            1.0 / v_scale, store=True)  # fmt: skip
    return qo


def _launch(positions, q, k, v, qo, ko, vo, slots, cos, sin, inv_ks, inv_vs, store) -> None:
    """One launch of `_rotary_kernel`: T programs × (H + Hkv) heads (nothing when T = 0)."""
    T, H, D = q.shape
    if T == 0:
        return
    fp8 = ko.dtype.itemsize == 1
    _rotary_kernel[(T, H + k.shape[1])](
        q, k, v, qo, ko, vo, positions, slots, cos, sin, inv_ks, inv_vs,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos.stride(0),
        H=H, HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2), STORE=store,
        IS_FP8=fp8, FP8_MAX=torch.finfo(ko.dtype).max if fp8 else 0.0,
        **pdl(q.device), num_warps=1,
    )  # fmt: skip
