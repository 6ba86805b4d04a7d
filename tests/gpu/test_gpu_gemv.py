"""Small-M W4A16/W8A16 GEMV (triton/wna16_gemv.py) against float64 oracles; graph == eager."""

from __future__ import annotations

import pytest
import torch
from gpu_util import (  # noqa: F401
    ACT_DTYPE,
    gpu_device,
    interpreter_scalar_index,
    quantize_wna16,
    rel_err,
)

from lowbit.kernels import dispatch

pytestmark = pytest.mark.gpu
CASES = [(4, 128, False, 384, 136), (4, 128, True, 256, 520), (4, 32, False, 160, 72),
         (8, 128, True, 384, 132), (8, 64, False, 320, 2056), (4, -1, True, 192, 64),
         (4, 128, False, 2048, 4104)]  # fmt: skip
# default, forced split-K (one chunk a program), and wide blocks with several warps
CONFIGS = [None, {"block_w": 32, "block_k": 16, "chunk": 32, "waves": 10**6},
           {"block_w": 128, "block_k": 64, "warps": 2, "waves": 1}]  # fmt: skip


def _gemv():
    from lowbit.kernels.triton.wna16_gemv import wna16_gemv

    return wna16_gemv


def _problem(M, bits, group, sym, K, N, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    qweight, scales, qzeros, deq = quantize_wna16(w, bits, K if group == -1 else group, sym)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    return qweight, scales, qzeros, deq, x, bias


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("bits,group,sym,K,N", CASES)
def test_wna16_gemv(dev, M, bits, group, sym, K, N, config):
    """Sym and zero-point, int4 and int8, N not a multiple of the block, with bias."""
    qweight, scales, qzeros, deq, x, bias = _problem(M, bits, group, sym, K, N, M + K + N)
    d = lambda t: None if t is None else t.to(dev)
    out = _gemv()(
        x.to(dev, ACT_DTYPE), d(qweight), scales.to(dev, ACT_DTYPE), d(qzeros), group, bits,
        bias.to(dev, ACT_DTYPE), config=config,
    )  # fmt: skip
    assert out.shape == (M, N) and out.dtype == ACT_DTYPE
    assert rel_err(out, x.double() @ deq.double().t() + bias.double()) < 1e-2


@pytest.mark.parametrize("M", [1, 3])
def test_wna16_gemv_act_order(dev, M):
    """Act-order: x columns read through `perm`, 3-D input, no bias."""
    qweight, scales, qzeros, deq, x, _ = _problem(M, 4, 128, False, 384, 264, 5)
    perm = torch.randperm(384, generator=torch.Generator().manual_seed(6))
    out = _gemv()(
        x.reshape(1, M, 384).to(dev, ACT_DTYPE), qweight.to(dev), scales.to(dev, ACT_DTYPE),
        qzeros.to(dev), 128, 4, None, perm.to(dev),
    )  # fmt: skip
    assert out.shape == (1, M, 264)
    assert rel_err(out[0], x[:, perm].double() @ deq.double().t()) < 1e-2


@pytest.mark.parametrize("M", [1, 3, 4, 5, 16, 17])
def test_dispatch_small_m(dev, M):
    """dispatch.wna16_gemm around the GEMV / tensor-core boundary gives the same function."""
    qweight, scales, qzeros, deq, x, bias = _problem(M, 4, 128, False, 512, 392, M)
    y = dispatch.wna16_gemm(
        x.to(dev, ACT_DTYPE), qweight.to(dev), scales.to(dev, ACT_DTYPE), qzeros.to(dev), 128,
        4, bias.to(dev, ACT_DTYPE),
    )  # fmt: skip
    assert rel_err(y, x.double() @ deq.double().t() + bias.double()) < 1e-2


@pytest.mark.parametrize("sym", [False, True])
def test_wna16_gemv_graph_replay_equals_eager(dev, sym):
    """CUDA-graph replay (split-K partials + reduce) is bit-identical to the eager call."""
    if dev.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    qweight, scales, qzeros, _, x, bias = _problem(1, 4, 128, sym, 4096, 1024, 9)
    args = [t.to(dev) if t is not None else None for t in (qweight, scales, qzeros, bias)]
    args[1], args[3] = args[1].to(ACT_DTYPE), args[3].to(ACT_DTYPE)
    xs = x.to(dev, ACT_DTYPE)
    gemv = _gemv()
    eager = gemv(xs, args[0], args[1], args[2], 128, 4, args[3])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gemv(xs, args[0], args[1], args[2], 128, 4, args[3])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv(xs, args[0], args[1], args[2], 128, 4, args[3])
    xs.copy_(torch.randn_like(xs))  # new input in the captured buffer
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, gemv(xs, args[0], args[1], args[2], 128, 4, args[3]))
    assert not torch.equal(out, eager)


def test_wna16_gemv_pipelined_default(dev):
    """Int4 at M = 1 takes the pipelined config by default, with fewer splits (4 waves) for
    weights up to FEW_WAVES_MAX_NK values than above; M = 2 and int8 keep the plain config."""
    from lowbit.kernels.triton import wna16_gemv as mod

    K, N = 4096, 6144
    assert N * K <= mod.FEW_WAVES_MAX_NK < 28672 * 4096
    assert mod._config(1, N, K, 128, 8)[5:] == (2, 1)  # stages, unroll
    assert mod._config(2, N, K, 128, 8)[5:] == (1, 0)
    assert mod._config(1, N, K, 128, 4)[5:] == (1, 0)
    # chunks a split: twice as many as with 8 waves (half the splits)
    assert mod._config(1, N, K, 128, 8)[3] == 2 * mod._config(1, N, K, 128, 8, waves=8)[3]
    qweight, scales, qzeros, deq, x, _ = _problem(1, 4, 128, False, K, N, 5)
    y = dispatch.wna16_gemm(x.to(dev, ACT_DTYPE), qweight.to(dev), scales.to(dev, ACT_DTYPE),
                            qzeros.to(dev), 128, 4)  # fmt: skip
    assert rel_err(y, x.double() @ deq.double().t()) < 1e-2
