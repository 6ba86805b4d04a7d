"""The CUDA-core W8A8 GEMV (FP8 and INT8, M ≤ 2) against a float64 reference of the same
quantized operands, on shapes that leave partial tiles and uneven splits."""

from __future__ import annotations

import pytest
import torch
from gpu_util import (  # noqa: F401
    ACT_DTYPE,
    gpu_device,
    interpreter_scalar_index,
    rel_err,
)

from lowbit.kernels import dispatch

pytestmark = pytest.mark.gpu
CONFIGS = [None, {"bn": 8, "bk": 64, "waves": 16}, {"bn": 32, "bk": 128, "stages": 3},
           {"bn": 8, "bk": 64, "waves": 16, "early": 1}]  # fmt: skip


def _operands(M, N, K, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    x = torch.randn(M, K, generator=gen)
    if dtype == torch.int8:
        ws = w.abs().amax(1) / 127
        wq = (w / ws[:, None]).round().clamp(-127, 127).to(torch.int8)
    else:
        ws = w.abs().amax(1) / 448
        wq = (w / ws[:, None]).to(torch.float8_e4m3fn)
    return x, wq, ws, torch.randn(N, generator=gen)


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("N,K", [(144, 272), (4104, 2048), (40, 4096 + 64)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("config", CONFIGS)
def test_w8a8_gemv(dev, M, N, K, dtype, config):
    if dtype != torch.int8 and not dispatch.fp8_mma_supported(dev):
        pytest.skip("fp8 codes need sm_89+ here")
    from lowbit.kernels.triton.w8a8_gemm import w8a8_gemm

    x, wq, ws, bias = _operands(M, N, K, dtype, M + N + K)
    y = w8a8_gemm(x.to(dev, ACT_DTYPE), wq.to(dev), ws.to(dev), None, bias.to(dev, ACT_DTYPE),
                  config={"path": "gemv", **(config or {})})  # fmt: skip
    ref = x.double() @ (wq.double() * ws.double()[:, None]).t() + bias.double()
    # 8-bit activations: the same bound as the tensor-core kernel's tests
    assert y.shape == (M, N) and rel_err(y, ref) < 4e-2
    mma = w8a8_gemm(x.to(dev, ACT_DTYPE), wq.to(dev), ws.to(dev), None, bias.to(dev, ACT_DTYPE),
                    config={"path": "mma"})  # fmt: skip
    # same quantized operands, fp32/int32 sums in another order: equal to bf16 rounding
    assert rel_err(y, mma.double()) < 1e-2


def test_w8a8_gemv_static_scale_and_graph(dev):
    """A static activation scale; CUDA-graph replay equals the eager call."""
    from lowbit.kernels.triton.w8a8_gemm import w8a8_gemm

    x, wq, ws, _ = _operands(1, 512, 1024, torch.int8, 3)
    xs = (x.abs().max() / 127).reshape(1)
    args = (x.to(dev, ACT_DTYPE), wq.to(dev), ws.to(dev), xs.to(dev))
    y = w8a8_gemm(*args, config={"path": "gemv"})
    ref = x.double() @ (wq.double() * ws.double()[:, None]).t()
    assert rel_err(y, ref) < 4e-2
    if dev.type != "cuda":
        return
    static_x = args[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w8a8_gemm(static_x, *args[1:], config={"path": "gemv"})
    static_x.copy_(args[0] * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    eager = w8a8_gemm(args[0] * 0.5, *args[1:], config={"path": "gemv"})
    assert torch.equal(out, eager)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_dispatch_takes_gemv_for_large_m1(dev, dtype):
    """At M = 1 every weight goes through the GEMV by default (M = 2 the MMA kernel), with
    dispatch's 8-row, 512-wide config, and stays correct."""
    if dtype != torch.int8 and not dispatch.fp8_mma_supported(dev):
        pytest.skip("fp8 codes need sm_89+ here")
    from lowbit.kernels.triton import w8a8_gemm as mod

    N, K = 6144, 4096
    assert mod.gemv_path(1) and not mod.gemv_path(2) and mod.GEMV_CONFIG["bn"] == 8
    x, wq, ws, _ = _operands(1, N, K, dtype, 9)
    args = (x.to(dev, ACT_DTYPE), wq.to(dev), ws.to(dev))
    y = dispatch.int8_gemm(*args) if dtype == torch.int8 else dispatch.fp8_scaled_mm(*args)
    ref = x.double() @ (wq.double() * ws.double()[:, None]).t()
    assert rel_err(y, ref) < 4e-2


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("N,K", [(144, 272), (4104, 2048), (40, 4096 + 64)])
@pytest.mark.parametrize("config", [None, {"bn": 8, "bk": 64, "waves": 16, "stages": 1},
                                    {"bn": 8, "bk": 64, "stages": 3, "early": 1}])  # fmt: skip
def test_gemv16(dev, M, N, K, config):
    """The unscaled 16-bit GEMV (bf16, or fp16 under the interpreter) against float64, with bias,
    partial row tiles and K not a multiple of the tile."""
    from lowbit.kernels.triton.w8a8_gemv import gemv16

    gen = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=gen).to(ACT_DTYPE)
    w = (torch.randn(N, K, generator=gen) * 0.05).to(ACT_DTYPE)
    bias = torch.randn(N, generator=gen).to(ACT_DTYPE)
    y = gemv16(x.to(dev), w.to(dev), bias.to(dev), config=config)
    ref = x.double() @ w.double().t() + bias.double()
    # exact 16-bit operands, fp32 sums: only the output's rounding (bf16 ≈ 4e-3)
    assert y.shape == (M, N) and y.dtype == ACT_DTYPE and rel_err(y, ref) < 8e-3
    no_bias = gemv16(x.to(dev), w.to(dev), config=config)
    assert rel_err(no_bias, x.double() @ w.double().t()) < 8e-3


def test_dense_linear_dispatch(dev, monkeypatch):
    """dispatch.linear: the GEMV up to GEMV16_MAX_M rows (leading dims kept), F.linear above,
    and the two agree to bf16 rounding; a CUDA-graph replay of the GEMV equals the eager call."""
    from lowbit.kernels.triton import w8a8_gemv as mod

    monkeypatch.setattr(dispatch, "GEMV16_MAX_M", 1)
    calls = []
    real = mod.gemv16
    monkeypatch.setattr(mod, "gemv16", lambda *a: calls.append(a[0].shape) or real(*a))
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(272, 1040, generator=gen) * 0.05).to(dev, ACT_DTYPE)
    x = torch.randn(3, 1040, generator=gen).to(dev, ACT_DTYPE)
    one = dispatch.linear(x[:1].reshape(1, 1, -1), w)
    assert one.shape == (1, 1, 272)
    ref = x.double() @ w.double().t()
    assert rel_err(one.reshape(1, -1), ref[:1]) < 8e-3
    assert rel_err(dispatch.linear(x, w), ref) < 8e-3  # M = 3 → F.linear
    assert calls == [(1, 1040)]
    if dev.type == "cuda":
        static = x[:1].clone()
        dispatch.linear(static, w)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = dispatch.linear(static, w)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, dispatch.linear(static, w))


@pytest.mark.parametrize("N,K", [(144, 272), (4104, 2048), (40, 4096 + 64)])
@pytest.mark.parametrize("stages", [1, 3])
def test_early_first_tile_gives_the_same_sums(dev, N, K, stages):
    """`early`: the first weight tile loaded before the PDL wait is summed first, as the loop
    would: the same bits as without it (even and masked shapes, pipelined or not, one tile a
    split or more)."""
    from lowbit.kernels.triton.w8a8_gemv import gemv16, w8a8_gemv

    x, wq, ws, bias = _operands(2, N, K, torch.int8, N + K)
    xq, xs = dispatch.act_quant(x.to(dev, ACT_DTYPE), torch.int8)
    for waves in (1, 64):  # long splits, and splits of one tile
        cfg = {"bn": 8, "bk": 64, "stages": stages, "waves": waves}
        args = (xq, xs, wq.to(dev), ws.to(dev), bias.to(dev, ACT_DTYPE), ACT_DTYPE)
        assert torch.equal(w8a8_gemv(*args, config={**cfg, "early": 1}),
                           w8a8_gemv(*args, config={**cfg, "early": 0}))  # fmt: skip
        x16, w16 = x.to(dev, ACT_DTYPE), (wq.float() * 0.01).to(dev, ACT_DTYPE)
        assert torch.equal(gemv16(x16, w16, config={**cfg, "early": 1}),
                           gemv16(x16, w16, config={**cfg, "early": 0}))  # fmt: skip


def test_gemv_config_gets_m_n_k(dev, monkeypatch):
    """Both entry points size their splits from (M, N, K) in that order."""
    from lowbit.kernels.triton import w8a8_gemv as mod

    seen = []
    real = mod._config
    monkeypatch.setattr(mod, "_config", lambda *a, **kw: seen.append(a[:3]) or real(*a, **kw))
    x, wq, ws, _ = _operands(1, 40, 272, torch.int8, 1)
    xq, xs = dispatch.act_quant(x.to(dev, ACT_DTYPE), torch.int8)
    mod.w8a8_gemv(xq, xs, wq.to(dev), ws.to(dev), None, ACT_DTYPE)
    mod.gemv16(x.to(dev, ACT_DTYPE), x.new_ones(40, 272).to(dev, ACT_DTYPE))
    assert seen == [(1, 40, 272), (1, 40, 272)]
