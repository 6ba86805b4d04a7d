"""Paged attention over block tables, plain torch (the CPU path and the GPU fallback).

A batch is a flat run of T new tokens from B sequences. Each sequence's keys and values live in
fixed-size blocks of the KV cache; `AttentionMetadata` holds, once per forward, the indices every
layer needs: where to write the new k/v, which cache slots each sequence reads, and the causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AttentionMetadata:
    """Per-forward indices shared by all layers. B sequences, T new tokens, Q/C padded lengths."""

    slot_mapping: Tensor  # (T,) cache slot of each new token
    token_index: Tensor  # (T,) position of each new token in the padded (B·Q) query grid
    kv_slots: Tensor  # (B, C) cache slots each sequence reads, 0 past its length
    mask: Tensor  # (B, 1, Q, C) bool, True where query may attend
    max_q: int  # Q


@dataclass
class KVCache:
    """One layer's paged cache: k and v of shape (num_slots, Hkv, D), slot = block·bs + offset.

    With an fp8 cache dtype, values are stored as `x / scale` in fp8 and read back times scale.
    """

    k: Tensor
    v: Tensor
    k_scale: float = 1.0
    v_scale: float = 1.0

    def write(self, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store new keys/values (T, Hkv, D) at their slots."""
        self.k[slots] = _to_cache(k, self.k.dtype, self.k_scale)
        self.v[slots] = _to_cache(v, self.v.dtype, self.v_scale)

    def read(self, slots: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Gather (…, Hkv, D) keys and values at `slots` in the compute dtype."""
        return (
            _from_cache(self.k[slots], dtype, self.k_scale),
            _from_cache(self.v[slots], dtype, self.v_scale),
        )


def _to_cache(x: Tensor, dtype: torch.dtype, scale: float) -> Tensor:
    """Compute dtype → cache dtype (scaled only for fp8)."""
    if dtype.itemsize == 1:
        return (x.float() / scale).to(dtype)
    return x.to(dtype)


def _from_cache(x: Tensor, dtype: torch.dtype, scale: float) -> Tensor:
    """Cache dtype → compute dtype."""
    if x.dtype.itemsize == 1:
        return (x.float() * scale).to(dtype)
    return x.to(dtype)


class Attention(nn.Module):
    """Scaled dot-product attention with grouped KV heads over a paged cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_id: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_id = layer_id
        self.scale = head_dim**-0.5

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata, cache: KVCache
    ) -> Tensor:
        """q (T, H, D), k/v (T, Hkv, D) → (T, H·D)."""
        cache.write(meta.slot_mapping, k, v)
        B, C = meta.kv_slots.shape
        T, H, D = q.shape
        keys, values = cache.read(meta.kv_slots, q.dtype)  # (B, C, Hkv, D)
        q_pad = q.new_zeros(B * meta.max_q, H, D)
        q_pad[meta.token_index] = q
        q_pad = q_pad.view(B, meta.max_q, H, D).transpose(1, 2)  # (B, H, Q, D)
        out = F.scaled_dot_product_attention(
            q_pad,
            keys.transpose(1, 2),  # (B, Hkv, C, D)
            values.transpose(1, 2),
            attn_mask=meta.mask,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # (B, H, Q, D)
        out = out.transpose(1, 2).reshape(B * meta.max_q, H * D)
        return out[meta.token_index]


def build_metadata(
    seq_lens: list[int],
    query_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Indices for B sequences of seq_len tokens each, of which the last query_len are new."""
    max_q, max_c = max(query_lens), max(seq_lens)
    max_blocks = max(len(t) for t in block_tables)
    table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.long)
    lens = torch.tensor(seq_lens, dtype=torch.long)
    qlens = torch.tensor(query_lens, dtype=torch.long)
    ctx = torch.arange(max_c)
    kv_slots = table[:, ctx // block_size] * block_size + ctx % block_size  # (B, C)
    kv_slots = torch.where(ctx[None, :] < lens[:, None], kv_slots, 0)
    # Query i of sequence b sits at absolute position seq_len - query_len + i.
    qpos = (lens - qlens)[:, None] + torch.arange(max_q)[None, :]  # (B, Q)
    valid_q = torch.arange(max_q)[None, :] < qlens[:, None]
    mask = (ctx[None, None, :] <= qpos[:, :, None]) & (ctx[None, None, :] < lens[:, None, None])
    # Padding queries attend to slot 0 only, so no row is fully masked (SDPA would give NaN).
    mask = mask & valid_q[:, :, None] | (~valid_q[:, :, None] & (ctx == 0)[None, None, :])
    token_index = torch.cat([b * max_q + torch.arange(n) for b, n in enumerate(query_lens)])
    slot_mapping = torch.cat([kv_slots[b, lens[b] - n : lens[b]] for b, n in enumerate(query_lens)])
    return AttentionMetadata(
        slot_mapping=slot_mapping.to(device),
        token_index=token_index.to(device),
        kv_slots=kv_slots.to(device),
        mask=mask[:, None].to(device),
        max_q=max_q,
    )
