"""The tensor-core W8A8 GEMV (triton/w8a8_mma.py, FP8 and INT8, M ≤ 16, weights as stored)
against float64 sums of the same quantized operands; graph == eager; dispatch takes it. Inline
PTX: no interpreter run."""

from __future__ import annotations

import os

import pytest
import torch
from gpu_util import (  # noqa: F401
    gpu_device,
    interpreter_scalar_index,
    rel_err,
)

from lowbit.kernels import dispatch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="inline PTX: compiled runs only"
    ),
]
CONFIGS = [None, {"waves": 10**6, "unroll": 1}, {"warps": 1, "max_split": 1}]


def _operands(M, N, K, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        xq = torch.randint(-127, 128, (M, K), generator=gen).to(torch.int8)
        wq = torch.randint(-127, 128, (N, K), generator=gen).to(torch.int8)
    else:
        xq = (torch.randn(M, K, generator=gen) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
        wq = (torch.randn(N, K, generator=gen) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    xs = torch.rand(M, 1, generator=gen) * 1e-2
    ws = torch.rand(N, generator=gen) * 1e-2
    return xq, xs, wq, ws, torch.randn(N, generator=gen)


def _skip_fp8(dev, dtype):
    if dtype != torch.int8 and not dispatch.fp8_mma_supported(dev):
        pytest.skip("e4m3 mma.sync needs sm_89+")


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("N,K", [(64, 256), (48, 1024), (256, 4096 + 64)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_w8a8_mma(dev, M, N, K, dtype, config):
    """Partial x tiles, 1 or 2 of them, split or not, several warps a program, with bias; the
    sum of the 8-bit products is exact up to fp32 accumulation."""
    _skip_fp8(dev, dtype)
    from lowbit.kernels.triton.w8a8_mma import w8a8_mma_gemv

    xq, xs, wq, ws, bias = _operands(M, N, K, dtype, M + N + K)
    y = w8a8_mma_gemv(xq.to(dev), xs.to(dev), wq.to(dev), ws.to(dev), bias.to(dev).bfloat16(),
                      torch.bfloat16, config)  # fmt: skip
    ref = (xq.double() @ wq.double().t()) * xs.double() * ws.double() + bias.bfloat16().double()
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_w8a8_mma_graph_replay_equals_eager(dev, dtype):
    _skip_fp8(dev, dtype)
    from lowbit.kernels.triton.w8a8_mma import w8a8_mma_gemv

    xq, xs, wq, ws, _ = _operands(1, 512, 4096, dtype, 3)
    xq, xs, wq, ws = xq.to(dev), xs.to(dev), wq.to(dev), ws.to(dev)
    eager = w8a8_mma_gemv(xq, xs, wq, ws, None, torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        w8a8_mma_gemv(xq, xs, wq, ws, None, torch.bfloat16)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w8a8_mma_gemv(xq, xs, wq, ws, None, torch.bfloat16)
    xs.mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, w8a8_mma_gemv(xq, xs, wq, ws, None, torch.bfloat16))
    assert not torch.equal(out, eager)


@pytest.mark.parametrize("M,taken", [(1, True), (16, True), (17, False)])
def test_w8a8_gemm_routes_small_m_to_mma16(dev, monkeypatch, M, taken):
    """w8a8_gemm (the FP8 / INT8 dispatch at small M) takes the tensor-core GEMV up to 16 rows
    of a supported shape, and gives the same function as its other paths."""
    from lowbit.kernels.triton import w8a8_gemm as mod

    calls = []
    real = mod.w8a8_mma.w8a8_mma_gemv
    monkeypatch.setattr(mod.w8a8_mma, "w8a8_mma_gemv", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(M)
    x = torch.randn(M, 512, generator=gen).to(dev, torch.bfloat16)
    w = torch.randint(-127, 128, (256, 512), generator=gen).to(torch.int8).to(dev)
    ws = (torch.rand(256, generator=gen) * 1e-2).to(dev)
    y = mod.w8a8_gemm(x, w, ws)
    assert bool(calls) == taken
    other = mod.w8a8_gemm(x, w, ws, config={"path": "mma"})
    assert rel_err(y, other.double()) < 1e-2
