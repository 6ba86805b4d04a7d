"""Tiled W4A16 tensor-core GEMM on the `mma16` layout (triton/wna16_mma_tiled.py) against float64
oracles of the dequantized weight: awkward M, N = 64 · odd, several groups, zero points and
symmetric, bias, act-order, split K, and every config the H100 sweep uses. Plain Triton: runs in
the interpreter too (fp16 there: numpy has no bf16)."""

from __future__ import annotations

import os

import pytest
import torch
from gpu_util import (  # noqa: F401
    ACT_DTYPE,
    gpu_device,
    interpreter_scalar_index,
    quantize_wna16,
    rel_err,
)

pytestmark = pytest.mark.gpu
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# (group, sym, K, N): groups of 64, 128 and one per row; N = 64 · odd
CASES = [(128, False, 512, 192), (64, True, 256, 320), (-1, False, 384, 64)]
# the tiles of benchmarks/bench_gemm.py's "w4a16:mma16tiled,…" probes (bk = 128 needs G % 128 == 0)
SWEEP = [
    {"bm": 16, "bn": 128, "bk": 128},
    {"bm": 32, "bn": 128, "bk": 128},
    {"bm": 64, "bn": 64, "bk": 128},
    {"bm": 64, "bn": 128, "bk": 64},
    {"bm": 128, "bn": 64, "bk": 128},
    {"bm": 128, "bn": 128, "bk": 64, "warps": 8, "stages": 3},
    {"bm": 256, "bn": 64, "bk": 128, "stages": 2},
    {"bm": 16, "bn": 64, "bk": 64, "split": 4},
]


def _problem(M, group, sym, K, N, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    qweight, scales, qzeros, deq = quantize_wna16(w, 4, K if group == -1 else group, sym)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    return qweight, scales, qzeros, deq, x, bias


def _run(dev, x, qweight, scales, qzeros, group, bias=None, perm=None, config=None):
    from lowbit.kernels.mma16 import pack_mma16
    from lowbit.kernels.triton.wna16_mma_tiled import wna16_mma_tiled

    d = lambda t: None if t is None else t.to(dev)
    return wna16_mma_tiled(x.to(dev), pack_mma16(qweight.to(dev)), d(scales.to(x.dtype)),
                           d(qzeros), group, d(bias), d(perm), config=config)  # fmt: skip


def _ref(x, deq, bias=None):
    y = x.double() @ deq.double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("M", [1, 17, 128, 129])
@pytest.mark.parametrize("group,sym,K,N", CASES)
def test_wna16_mma_tiled(dev, M, group, sym, K, N):
    """Default configs (each M bucket, split K where the tiles are few) with bias; the partial
    row tile's rows past M and the column tile's columns past N neither read nor write."""
    qweight, scales, qzeros, deq, x, bias = _problem(M, group, sym, K, N, M + K + N)
    x, bias = x.to(ACT_DTYPE), bias.to(ACT_DTYPE)
    out = _run(dev, x, qweight, scales, qzeros, group, bias)
    assert out.shape == (M, N) and out.dtype == ACT_DTYPE
    assert rel_err(out, _ref(x, deq, bias)) < 1e-2


@pytest.mark.parametrize("config", SWEEP, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_wna16_mma_tiled_sweep_configs(dev, config):
    """Every config of the sweep, unsplit and split in two, on N = 64 · 5 (bn = 128 and 256
    overhang it) with zero points and bias."""
    M, K, N = 33, 512, 320
    qweight, scales, qzeros, deq, x, bias = _problem(M, 128, False, K, N, 7)
    x, bias = x.to(ACT_DTYPE), bias.to(ACT_DTYPE)
    for split in (1, 2):
        cfg = {"split": split, **config}
        out = _run(dev, x, qweight, scales, qzeros, 128, bias, config=cfg)
        assert rel_err(out, _ref(x, deq, bias)) < 1e-2, cfg


@pytest.mark.skipif(INTERPRET, reason="numpy has no bf16: the interpreter runs fp16 only")
@pytest.mark.parametrize("M", [16, 100])
def test_wna16_mma_tiled_bf16(dev, M):
    """bf16 activations and scales (the bf16 magic number 128)."""
    qweight, scales, qzeros, deq, x, bias = _problem(M, 64, False, 256, 192, M)
    x, bias = x.bfloat16(), bias.bfloat16()
    out = _run(dev, x, qweight, scales, qzeros, 64, bias)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, _ref(x, deq, bias)) < 1e-2


def test_wna16_mma_tiled_fp16(dev):
    """fp16 activations and scales (the fp16 magic number 1024), symmetric, no bias."""
    qweight, scales, qzeros, deq, x, _ = _problem(24, 128, True, 256, 128, 3)
    out = _run(dev, x.half(), qweight, scales, qzeros, 128)
    assert out.dtype == torch.float16
    assert rel_err(out, _ref(x.half(), deq)) < 1e-2


def test_wna16_mma_tiled_exact_integers(dev):
    """Codes, zeros and the k order of every 64 × 64 block land where they belong: integer x and
    power-of-two scales give the exact sum (a misplaced code or a wrong group changes it)."""
    from gpu_util import pack_along_n

    K, N = 256, 192
    gen = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (K // 64, N), generator=gen, dtype=torch.int32)
    qweight, qzeros = pack_along_n(codes, 4), pack_along_n(zeros, 4)
    scales = 2.0 ** torch.randint(-3, 1, (K // 64, N), generator=gen).to(ACT_DTYPE)
    x = torch.randint(-3, 4, (19, K), generator=gen).to(ACT_DTYPE)
    w = (codes - zeros.repeat_interleave(64, 0)).double() * scales.double().repeat_interleave(
        64, 0
    )  # (K, N)
    for config in ({"bk": 64, "split": 1}, {"bm": 16, "bn": 64, "bk": 64, "split": 2}):
        out = _run(dev, x, qweight, scales, qzeros, 64, config=config)
        assert torch.equal(out.double().cpu(), (x.double() @ w).to(ACT_DTYPE).double()), config


def test_wna16_mma_tiled_act_order(dev):
    """Act-order: x columns read through `perm`, 3-D input, no rows at all."""
    qweight, scales, qzeros, deq, x, _ = _problem(6, 128, False, 384, 192, 5)
    x = x.to(ACT_DTYPE)
    perm = torch.randperm(384, generator=torch.Generator().manual_seed(6))
    out = _run(dev, x.reshape(2, 3, 384), qweight, scales, qzeros, 128, perm=perm)
    assert out.shape == (2, 3, 192)
    assert rel_err(out.reshape(6, 192), _ref(x[:, perm], deq)) < 1e-2
    empty = _run(dev, x[:0], qweight, scales, qzeros, 128, perm=perm)
    assert empty.shape == (0, 192)


def test_wna16_mma_tiled_rejects_bad_config(dev):
    """Unknown keys and a K tile that straddles groups are refused, naming the problem."""
    from lowbit.kernels.triton.wna16_mma_tiled import _config

    with pytest.raises(ValueError, match="unknown wna16_mma_tiled config keys"):
        _config(16, 128, 256, 64, swap=1)
    qweight, scales, qzeros, _, x, _ = _problem(4, 64, False, 256, 64, 1)
    with pytest.raises(AssertionError, match="bk dividing G"):
        _run(dev, x.to(ACT_DTYPE), qweight, scales, qzeros, 64, config={"bk": 128})


@pytest.mark.parametrize("M,tiled", [(16, False), (33, True), (64, True), (65, False)])
def test_dispatch_routes_wide_weights_at_33_to_64_rows(dev, monkeypatch, M, tiled):
    """dispatch.wna16_gemm over the mma16 layout: wide weights (N ≥ WNA16_MMA_TILED_MIN_N,
    lowered here to keep the test small) at 33-64 rows take the tiled kernel with its default
    config, which at those rows is the H100 sweep's winner on gate_up; other M the other paths;
    every route gives the same product."""
    from lowbit.kernels import dispatch
    from lowbit.kernels.mma16 import pack_mma16
    from lowbit.kernels.triton import wna16_mma_tiled as mod

    if dev.type != "cuda" and M <= dispatch.WNA16_MMA_MAX_M and not tiled:
        pytest.skip("the small-M kernel is inline PTX: compiled runs only")
    calls = []
    real = mod.wna16_mma_tiled
    monkeypatch.setattr(mod, "wna16_mma_tiled", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(dispatch, "WNA16_MMA_TILED_MIN_N", 192)
    monkeypatch.setattr(dispatch, "use_triton", lambda device: True)
    qweight, scales, qzeros, deq, x, bias = _problem(M, 128, False, 256, 192, M)
    x = x.to(ACT_DTYPE)
    y = dispatch._wna16_mma(x.to(dev), pack_mma16(qweight.to(dev)), scales.to(dev, ACT_DTYPE),
                            qzeros.to(dev), 128, bias.to(dev, ACT_DTYPE), None)  # fmt: skip
    assert [c.get("config") for c in calls] == ([None] if tiled else [])
    if tiled:  # the routed config: bm 64, bn 128, bk 128, 3 stages, one split on gate_up
        cfg = mod._config(M, 28672, 4096, 128)
        assert {k: cfg[k] for k in ("bm", "bn", "bk", "warps", "stages", "split")} == {
            "bm": 64,
            "bn": 128,
            "bk": 128,
            "warps": 4,
            "stages": 3,
            "split": 1,
        }
    assert y.shape == (M, 192) and rel_err(y, _ref(x, deq, bias.to(ACT_DTYPE))) < 1e-2
