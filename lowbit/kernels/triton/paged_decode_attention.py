"""Paged decode attention: one new query token per sequence over its paged KV cache.

Split-KV (flash-decoding): each program takes one (sequence, KV head, context split) and all the
query heads of that KV head's group, so batch 1 with 8 KV heads still fills the GPU. The last
split of a (sequence, KV head) to finish merges the splits' partial softmaxes (the arrival
counters of `common.splitk_counters`; a second kernel when they are off or unavailable). fp8
caches are read and multiplied by their scale.
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
    prefetch_l2,
    reset_arrivals,
    splitk_counters,
)

BLOCK_N = 64  # context tokens per inner step
NUM_STAGES = 2  # loads in flight across steps (Triton's pipeliner)
# ... and for a 16-bit cache when the launch is one split a (sequence, KV head), i.e. batch ×
# KV heads fill the GPU: µs a call, H100, batch 64, contexts 192 / 1024 / 4096
# (benchmarks/RESULTS.md run 12): 2 stages 22.5 / 101 / 391, 1 stage 21.1 / 93.8 / 361; batch
# 1 (32 splits) is faster with 2, and so is an fp8 cache (192 / 1024: 17.4 / 71.1 with 2,
# 17.8 / 78.6 with 1)
ONE_SPLIT_STAGES = 1
NUM_WARPS = 4
TARGET_PROGRAMS = 264  # ~2 waves of 132 SMs (H100 SXM)
MAX_SPLITS = 32
# a context of up to this many tokens is one program a KV head, which writes its output itself
# (no partials, no merge); longer ones split as before. H100, Llama-3-8B shape, batch 1 at
# 128-180 tokens (benchmarks/RESULTS.md run 11): w4a16 decode 370 tok/s split into 64-token
# pieces, 380 as one split (and 364 with splits of at least 128)
SHORT_CONTEXT = 256
# Before its PDL wait a program asks L2 for its split's cached K and V rows (the context length
# and block table come from the host before the step's first kernel; the one row the previous
# kernel writes is only prefetched early, then read after the wait) — where the launch has
# splits (few sequences: the GPU is not filled). H100 (benchmarks/RESULTS.md run 15), decode
# tok/s off → on: batch 1 fp8 287 / 288 → 290 / 290, w4a16 408 / 409 → 410 / 409; at batch 64
# (one split) it cost 1-2 % (fp8 11,730 → 11,473), hence not there. An A/B switch.
PREFETCH_KV = True


@triton.jit
def _active_splits(seq_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                   SHORT: tl.constexpr):  # fmt: skip
    """(tokens a split, splits with tokens — at least 1) for a sequence of seq_len tokens:
    whole BLOCK_N steps over NUM_SPLITS splits, or one split up to SHORT tokens."""
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    per_split = tl.maximum(tl.where(seq_len <= SHORT, SHORT, per_split), BLOCK_N)  # len 0: 1
    return per_split, tl.maximum(tl.cdiv(seq_len, per_split), 1)


@triton.jit
def _paged_decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, part_ptr, ml_ptr, cnt_ptr,
    scale, k_scale, v_scale,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_tb, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    IS_FP8: tl.constexpr, FUSED_MERGE: tl.constexpr, SHORT: tl.constexpr,
    PREFETCH: tl.constexpr, PF_TOKENS: tl.constexpr, PF_LINES: tl.constexpr,
    LINE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    split = tl.program_id(2)
    if PREFETCH:  # the context length and block table are the host's: readable before the wait
        seq_len = tl.load(lens_ptr + b)
        per_split, active = _active_splits(seq_len, NUM_SPLITS, BLOCK_N, SHORT)
        if split < active:
            _prefetch_kv(k_ptr, v_ptr, table_ptr, b * stride_tb, hkv * stride_kh, stride_ks,
                         split * per_split, tl.minimum(split * per_split + per_split, seq_len),
                         BLOCK_SIZE, PF_TOKENS, PF_LINES, LINE)  # fmt: skip
    pdl_enter(PDL)
    if not PREFETCH:
        seq_len = tl.load(lens_ptr + b)
        per_split, active = _active_splits(seq_len, NUM_SPLITS, BLOCK_N, SHORT)
    if split < active:  # the splits past the context have nothing to do, not even arrive
        _attend(q_ptr, k_ptr, v_ptr, table_ptr, out_ptr, part_ptr, ml_ptr, cnt_ptr, scale,
                k_scale, v_scale, stride_qb, stride_qh, stride_ks, stride_kh, stride_tb,
                stride_ob, stride_oh, b, hkv, split, seq_len, per_split, active, GROUP,
                GROUP_PAD, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, NUM_SPLITS, IS_FP8,
                FUSED_MERGE)  # fmt: skip


@triton.jit
def _prefetch_kv(k_ptr, v_ptr, table_ptr, table_off, head_off, stride_ks, start, end,
                 BLOCK_SIZE: tl.constexpr, PF_TOKENS: tl.constexpr, PF_LINES: tl.constexpr,
                 LINE: tl.constexpr):  # fmt: skip
    """Ask L2 for the K and V rows of tokens [start, end): PF_TOKENS rows a pass (one a
    thread), PF_LINES lines of LINE elements a row (`common.prefetch_l2`)."""
    for s in range(start, end, PF_TOKENS):
        tok = s + tl.arange(0, PF_TOKENS)
        on = tok < end
        block = tl.load(table_ptr + table_off + tok // BLOCK_SIZE, mask=on, other=0)
        row = (block.to(tl.int64) * BLOCK_SIZE + tok % BLOCK_SIZE) * stride_ks + head_off
        for line in tl.static_range(PF_LINES):
            prefetch_l2(k_ptr + row + line * LINE, on)
            prefetch_l2(v_ptr + row + line * LINE, on)


@triton.jit
def _attend(q_ptr, k_ptr, v_ptr, table_ptr, out_ptr, part_ptr, ml_ptr, cnt_ptr, scale, k_scale,
            v_scale, stride_qb, stride_qh, stride_ks, stride_kh, stride_tb, stride_ob,
            stride_oh, b, hkv, split, seq_len, per_split, active, GROUP: tl.constexpr,
            GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
            IS_FP8: tl.constexpr, FUSED_MERGE: tl.constexpr):  # fmt: skip
    """One (sequence, KV head, split) with tokens: its partial softmax, or the output itself
    when it is the sequence's only split."""
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = hkv * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    # The group's query heads are the rows of a (GROUP_PAD ≥ 16, D) tile, so both products
    # run on the tensor cores; padding rows are zero and never stored.
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (G, D)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for s in range(start, end, BLOCK_N):
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
        qk = tl.dot(q, tl.trans(k)) * scale  # (G, N) float32
        qk = tl.where(t_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    if active == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty), mask=out_mask,
        )  # fmt: skip
    else:
        # part (B, H, S, D) float32; ml (B, H, S, 2) = running max, running sum.
        H = tl.num_programs(1) * GROUP
        row = (b * H + heads) * NUM_SPLITS + split  # (G,)
        tl.store(part_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)
        tl.store(ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=g_mask)
        if FUSED_MERGE:  # the last active split of (b, hkv) to finish merges its group's heads
            tile = b * tl.num_programs(1) + hkv
            if arrive_last(cnt_ptr, tile, active):
                for gi in tl.static_range(GROUP):
                    _merge_head(part_ptr, ml_ptr, out_ptr, b, hkv * GROUP + gi, H, active,
                                stride_ob, stride_oh, HEAD_DIM, BLOCK_D,
                                NUM_SPLITS)  # fmt: skip
                reset_arrivals(cnt_ptr, tile)


@triton.jit
def _merge_splits_kernel(
    part_ptr, ml_ptr, out_ptr, lens_ptr, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr, SHORT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    b = tl.program_id(0)
    _, active = _active_splits(tl.load(lens_ptr + b), NUM_SPLITS, BLOCK_N, SHORT)
    if active > 1:  # one split wrote the output itself
        _merge_head(part_ptr, ml_ptr, out_ptr, b, tl.program_id(1), tl.num_programs(1), active,
                    stride_ob, stride_oh, HEAD_DIM, BLOCK_D, NUM_SPLITS)  # fmt: skip


@triton.jit
def _merge_head(part_ptr, ml_ptr, out_ptr, b, h, H, active, stride_ob, stride_oh,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                NUM_SPLITS: tl.constexpr):  # fmt: skip
    """out[b, h] from the partial softmaxes of head h's first `active` > 1 splits (read at L2:
    other programs wrote them), each of which has tokens, so their maxima are finite."""
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    row = (b * H + h) * NUM_SPLITS + s  # (S,)
    live = s < active
    m = tl.load(ml_ptr + row * 2, mask=live, other=float("-inf"), cache_modifier=".cg")
    l_s = tl.load(ml_ptr + row * 2 + 1, mask=live, other=0.0, cache_modifier=".cg")
    w = tl.exp(m - tl.max(m, axis=0))  # (S,): 0 past the live splits
    denom = tl.sum(w * l_s, axis=0)
    part = tl.load(part_ptr + row[:, None] * HEAD_DIM + d[None, :],
                   mask=live[:, None] & (d[None, :] < HEAD_DIM), other=0.0,
                   cache_modifier=".cg")  # fmt: skip
    out = tl.sum(part * w[:, None], axis=0) / denom
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + d,
        out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM,
    )  # fmt: skip


def num_splits_for(batch: int, num_kv_heads: int) -> int:
    """Context splits so that batch × KV heads × splits covers about two waves of SMs."""
    splits = max(1, TARGET_PROGRAMS // max(1, batch * num_kv_heads))
    return min(MAX_SPLITS, triton.next_power_of_2(splits))


def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    block_size: int,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    num_splits: int | None = None,
) -> Tensor:
    """Attention of one query token per sequence over its cached context (CUDA-graph safe).

    q             (B, H, D)         compute dtype
    k/v_cache     (S, Hkv, D)       compute dtype or fp8; slot = block · block_size + offset
    block_tables  (B, max_blocks)   int32, block ids of each sequence
    seq_lens      (B,)              int32, context length incl. the new token; 0 → output 0
    block_size    tokens per KV block
    returns       (B, H, D)         compute dtype
    """
    B, H, D = q.shape
    S, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape, (q.shape, k_cache.shape, v_cache.shape)
    assert H % Hkv == 0, f"{H} query heads are not a multiple of {Hkv} KV heads"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B, block_tables.shape
    assert seq_lens.shape == (B,), seq_lens.shape
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.stride() == v_cache.stride()
    assert S % block_size == 0, (S, block_size)
    splits = num_splits or num_splits_for(B, Hkv)
    group = H // Hkv
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    part = ml = out  # unused when splits == 1
    counters = None
    if splits > 1:
        part = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(B, H, splits, 2, dtype=torch.float32, device=q.device)
        counters = splitk_counters(q.device, B * Hkv)
    block_d = triton.next_power_of_2(D)
    _paged_decode_attention_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part, ml,
        counters if counters is not None else out, scale, k_scale, v_scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D,
        BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N, NUM_SPLITS=splits,
        IS_FP8=k_cache.dtype.itemsize == 1, FUSED_MERGE=counters is not None,
        SHORT=SHORT_CONTEXT, PREFETCH=PREFETCH_KV and splits > 1, PF_TOKENS=32 * NUM_WARPS,
        PF_LINES=triton.cdiv(D * k_cache.element_size(), 128), LINE=128 // k_cache.element_size(),
        **pdl(q.device), num_warps=NUM_WARPS,
        num_stages=ONE_SPLIT_STAGES if splits == 1 and k_cache.dtype.itemsize == 2 else NUM_STAGES,
    )  # fmt: skip
    if splits > 1 and counters is None:
        _merge_splits_kernel[(B, H)](
            part, ml, out, seq_lens, out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_D=block_d, NUM_SPLITS=splits, BLOCK_N=BLOCK_N,
            SHORT=SHORT_CONTEXT, **pdl(out.device), num_warps=4,
        )  # fmt: skip
    return out
