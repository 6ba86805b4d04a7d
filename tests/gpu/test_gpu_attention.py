"""Paged attention kernels and the KV store against a float64 oracle, bf16 and fp8 caches."""

from __future__ import annotations

import pytest
import torch
from gpu_util import (  # noqa: F401
    ACT_DTYPE,
    gpu_device,
    interpreter_scalar_index,
    paged_attention_oracle,
    rel_err,
)

from lowbit.kernels import dispatch

pytestmark = pytest.mark.gpu
H, HKV, D, BS = 8, 2, 64, 16


def _cache(dev, num_blocks, dtype, gen):
    """Random k/v caches (slots, Hkv, D), stored in `dtype`."""
    shape = (num_blocks * BS, HKV, D)
    k = torch.randn(shape, generator=gen).to(dev)
    v = torch.randn(shape, generator=gen).to(dev)
    return k.to(dtype), v.to(dtype)


def _tables(seq_lens, num_blocks, gen):
    """Disjoint shuffled block tables (B, max_blocks) int32."""
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(1, max(-(-L // BS) for L in seq_lens))
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for b, L in enumerate(seq_lens):
        n = -(-L // BS)
        tables[b, :n] = perm[used : used + n]
        used += n
    return tables


@pytest.mark.parametrize("cache_dtype", [ACT_DTYPE, torch.float8_e4m3fn])
@pytest.mark.parametrize("splits,fused", [(None, True), (1, True), (8, True), (8, False)])
@pytest.mark.parametrize("short", [64, 256])
@pytest.mark.parametrize("prefetch", [False, True])
def test_decode_attention(dev, monkeypatch, cache_dtype, splits, fused, short, prefetch):
    """One query per sequence, lengths 1…300 (and 0 = padding row → zeros); split contexts
    merged by the last split of each head group (fused) or by the merge kernel; contexts up to
    `short` tokens are one split, written directly (with 256 all but the 300-token one); with
    or without the K / V rows prefetched before the PDL wait (launches of several splits)."""
    from lowbit.kernels.triton import common
    from lowbit.kernels.triton import paged_decode_attention as mod

    monkeypatch.setattr(common, "FUSED_SPLITK", fused)
    monkeypatch.setattr(mod, "SHORT_CONTEXT", short)
    monkeypatch.setattr(mod, "PREFETCH_KV", prefetch)
    got = []  # the counters the kernel was given: the fused merge ran iff there were any
    monkeypatch.setattr(mod, "splitk_counters", lambda *a: got.append(common.splitk_counters(*a))
                        or got[-1])  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    seq_lens = [1, 17, 128, 129, 300, 0]
    kc, vc = _cache(dev, 64, cache_dtype, gen)
    tables = _tables(seq_lens, 64, gen)
    q = torch.randn(len(seq_lens), H, D, generator=gen).to(dev, ACT_DTYPE)
    ks, vs = (0.5, 2.0) if cache_dtype.itemsize == 1 else (1.0, 1.0)
    out = dispatch.paged_decode_attention(
        q, kc, vc, tables.to(dev), torch.tensor(seq_lens, dtype=torch.int32, device=dev), BS,
        D**-0.5, ks, vs, splits,
    )  # fmt: skip
    ref = paged_attention_oracle(q, kc, vc, tables, seq_lens, [1] * len(seq_lens), BS, ks, vs)
    assert out.shape == q.shape
    assert rel_err(out[:-1], ref[:-1]) < 1e-2
    assert torch.all(out[-1] == 0)
    assert [c is not None for c in got] == ([] if splits == 1 else [fused])
    # the merge put every arrival counter back to zero (else the next call merges early)
    assert all(int(c.abs().sum()) == 0 for c in common._COUNTERS.get(str(dev), []))


@pytest.mark.parametrize("cache_dtype", [ACT_DTYPE, torch.float8_e5m2])
def test_prefill_attention_with_cached_prefix(dev, cache_dtype):
    """Query runs of 1, 17, 128, 129 new tokens after cached prefixes of 0…40 tokens."""
    gen = torch.Generator().manual_seed(1)
    query_lens = [1, 17, 128, 129]
    seq_lens = [q + p for q, p in zip(query_lens, [5, 0, 40, 3])]
    kc, vc = _cache(dev, 64, cache_dtype, gen)
    tables = _tables(seq_lens, 64, gen)
    T = sum(query_lens)
    q = torch.randn(T, H, D, generator=gen).to(dev, ACT_DTYPE)
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    out = dispatch.paged_prefill_attention(
        q, kc, vc, tables.to(dev), torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        starts.to(dev), max(query_lens), BS, D**-0.5,
    )  # fmt: skip
    ref = paged_attention_oracle(q, kc, vc, tables, seq_lens, query_lens, BS)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("cache_dtype", [ACT_DTYPE, torch.float8_e4m3fn])
def test_rotary_kv_store(dev, cache_dtype):
    """The fused launch returns `rotary`'s q, and writes the rotated k and v at their slots as
    `KVCache.write` stores them (fp8: x / scale, saturated) up to the rounding of a differently
    compiled kernel; slot -1 writes nothing."""
    from lowbit.layers.attention import KVCache
    from lowbit.layers.rotary import RotaryEmbedding

    gen = torch.Generator().manual_seed(3)
    rope = RotaryEmbedding(D, 512, 10000.0, None).to(dev)
    kc, vc = _cache(dev, 8, cache_dtype, gen)
    k0, v0 = kc.clone(), vc.clone()
    qkv = torch.randn(3, (H + 2 * HKV) * D, generator=gen).to(dev, ACT_DTYPE)
    q, k, v = (t.view(3, -1, D) for t in qkv.split([H * D, HKV * D, HKV * D], dim=-1))
    pos = torch.tensor([0, 7, 300], device=dev)
    slots = torch.tensor([5, -1, 77], device=dev)
    scale = 2.0 if cache_dtype.itemsize == 1 else 1.0
    rq, rk = dispatch.rotary(pos, q, k, rope.cos, rope.sin)
    ref = KVCache(kc.clone(), vc.clone(), scale, scale)
    ref.write(slots[[0, 2]], rk[[0, 2]], v[[0, 2]])
    got = dispatch.rotary_kv_store(pos, q, k, v, rope.cos, rope.sin, kc, vc, slots, scale,
                                   scale)  # fmt: skip
    assert rel_err(got, rq) < 2e-3
    for i, s in ((0, 5), (2, 77)):  # k rotated and v, as x / scale
        assert rel_err(kc[s].float() * scale, rk[i].float()) < 0.1
        assert rel_err(vc[s].float() * scale, v[i].float()) < 0.1
    keep = torch.ones(kc.shape[0], dtype=torch.bool)
    keep[[5, 77]] = False
    # fp8: up to one code step apart (Triton's interpreter rounds to fp8 unlike torch)
    bound = 0.1 if cache_dtype.itemsize == 1 else 2e-2
    for fused, want, before in ((kc, ref.k, k0), (vc, ref.v, v0)):
        assert rel_err(fused[[5, 77]].float(), want[[5, 77]].float()) < bound
        assert torch.equal(fused[keep].view(torch.uint8), before[keep].view(torch.uint8))
