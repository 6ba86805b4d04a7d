"""Write new keys and values into the paged KV cache in one launch (fp8: divide by scale, cast).

Slots < 0 are skipped: CUDA-graph padding rows carry slot -1 and write nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.triton.common import pdl, pdl_enter

# Largest finite values: stores saturate instead of overflowing to NaN/inf.
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


@triton.jit
def _kv_store_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, inv_k_scale, inv_v_scale,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP8: tl.constexpr, FP8_MAX: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    d = tl.arange(0, BLOCK_D)
    mask = d < HEAD_DIM
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if IS_FP8:
        k = tl.clamp(k.to(tl.float32) * inv_k_scale, -FP8_MAX, FP8_MAX)
        v = tl.clamp(v.to(tl.float32) * inv_v_scale, -FP8_MAX, FP8_MAX)
    dst = slot * stride_cs + h * stride_ch + d
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def kv_store(
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store k, v at their cache slots.

    k, v          (T, Hkv, D)   compute dtype (any strides with unit last stride)
    k/v_cache     (S, Hkv, D)   compute dtype or fp8 (then stored as x / scale, saturated)
    slots         (T,)          int64 or int32; < 0 means skip
    """
    T, Hkv, D = k.shape
    assert v.shape == k.shape, (k.shape, v.shape)
    assert k_cache.shape[1:] == (Hkv, D) and v_cache.shape == k_cache.shape, k_cache.shape
    assert slots.shape == (T,), slots.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    if T == 0:
        return
    itemsize = k_cache.dtype.itemsize
    fp8_max = FP8_MAX.get(k_cache.dtype, 0.0)
    _kv_store_kernel[(T, Hkv)](
        k, v, k_cache, v_cache, slots, 1.0 / k_scale, 1.0 / v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1),
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), IS_FP8=itemsize == 1, FP8_MAX=fp8_max,
        **pdl(k.device), num_warps=1,
    )  # fmt: skip
