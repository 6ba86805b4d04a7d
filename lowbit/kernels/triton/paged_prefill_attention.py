"""Paged prefill attention: variable-length query runs over a paged cache with a cached prefix.

The new tokens' keys and values are written to the cache first, so every key — cached prefix or
new — is read from the paged cache. Query i of a sequence with L cached+new tokens and q new ones
sits at position L - q + i and attends causally to positions ≤ its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.triton.common import pdl, pdl_enter

BLOCK_M = 64  # query rows per program
BLOCK_N = 64  # context tokens per inner step


@triton.jit
def _paged_prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, qstart_ptr, out_ptr,
    scale, k_scale, v_scale,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_tb, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_FP8: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    tile = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(qstart_ptr + b)
    q_len = tl.load(qstart_ptr + b + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(lens_ptr + b)
    hkv = h // GROUP
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_mask = m < q_len
    d_mask = d < HEAD_DIM
    pos = seq_len - q_len + m  # (M,) absolute positions of these queries
    q = tl.load(
        q_ptr + (q_start + m)[:, None] * stride_qt + h * stride_qh + d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (M, D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    # Keys past the last query's position are never attended.
    end = tl.minimum(seq_len, seq_len - q_len + (tile + 1) * BLOCK_M)
    for s in range(0, end, BLOCK_N):
        tok = s + n
        t_mask = tok < end
        block = tl.load(table_ptr + b * stride_tb + tok // BLOCK_SIZE, mask=t_mask, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + tok % BLOCK_SIZE
        kv_off = slot[:, None] * stride_ks + hkv * stride_kh + d[None, :]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # (N, D)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        if IS_FP8:
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        qk = tl.dot(q, tl.trans(k)) * scale  # (M, N) float32
        allowed = (tok[None, :] <= pos[:, None]) & t_mask[None, :]
        qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + (q_start + m)[:, None] * stride_ot + h * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :],
    )  # fmt: skip


def paged_prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start: Tensor,
    max_query_len: int,
    block_size: int,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> Tensor:
    """Causal attention of T new tokens from B sequences over their paged caches.

    q             (T, H, D)         compute dtype; sequence b owns rows query_start[b]:[b+1]
    k/v_cache     (S, Hkv, D)       compute dtype or fp8; slot = block · block_size + offset
    block_tables  (B, max_blocks)   int32
    seq_lens      (B,)              int32, cached + new tokens
    query_start   (B + 1,)          int32, cumulative new-token counts
    returns       (T, H, D)         compute dtype
    """
    T, H, D = q.shape
    S, Hkv, Dk = k_cache.shape
    B = seq_lens.shape[0]
    assert Dk == D and v_cache.shape == k_cache.shape, (q.shape, k_cache.shape, v_cache.shape)
    assert H % Hkv == 0, f"{H} query heads are not a multiple of {Hkv} KV heads"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B, block_tables.shape
    assert query_start.shape == (B + 1,), query_start.shape
    assert S % block_size == 0, (S, block_size)
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(max_query_len, BLOCK_M), B, H)
    _paged_prefill_attention_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start, out,
        scale, k_scale, v_scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=H // Hkv, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_SIZE=block_size,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, IS_FP8=k_cache.dtype.itemsize == 1,
        **pdl(q.device), num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
