"""Small-M W4A16 tensor-core kernel on the `mma16` layout (triton/wna16_mma.py) against float64
oracles; graph == eager. Inline PTX (MMA fragments, vector loads): no interpreter run."""

from __future__ import annotations

import os

import pytest
import torch
from gpu_util import (  # noqa: F401
    gpu_device,
    interpreter_scalar_index,
    quantize_wna16,
    rel_err,
)

pytestmark = pytest.mark.gpu
NEEDS_PTX = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="inline PTX: compiled runs only"
)
# (group, sym, K, N): groups of 64, 128 and one per row; N a multiple of 64, K of 64
CASES = [(128, False, 512, 192), (64, True, 256, 320), (-1, False, 384, 128),
         (128, True, 1024, 64)]  # fmt: skip
CONFIGS = [None, {"waves": 10**6}, {"e": 1}, {"e": 2, "waves": 1}, {"early": 0},
           {"early": 0, "waves": 1}, {"kw": 4}, {"kw": 2, "gpw": 2, "early": 0},
           {"early": 2, "max_split": 1}, {"kw": 2, "gpw": 2, "early": 2}]  # fmt: skip
# (the two `early: 2` configs leave a warp ≥ 2 groups where the shape has them, so two really
# load before the wait at every M; with more splits the kernel takes min(early, groups a warp))


def _problem(M, group, sym, K, N, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    qweight, scales, qzeros, deq = quantize_wna16(w, 4, K if group == -1 else group, sym)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    return qweight, scales.to(dtype), qzeros, deq, x, bias


def _run(dev, x, qweight, scales, qzeros, group, bias=None, perm=None, config=None):
    from lowbit.kernels.mma16 import pack_mma16
    from lowbit.kernels.triton.wna16_mma import wna16_mma_gemm

    d = lambda t: None if t is None else t.to(dev)
    return wna16_mma_gemm(x.to(dev), pack_mma16(qweight.to(dev)), d(scales), d(qzeros), group,
                          d(bias), d(perm), config=config)  # fmt: skip


@NEEDS_PTX
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("M", [1, 2, 7, 9, 16, 17, 33, 64])
@pytest.mark.parametrize("group,sym,K,N", CASES)
def test_wna16_mma(dev, M, group, sym, K, N, config):
    """Sym and zero points, groups of 64 / 128 / all K, 1–8 x tiles, split or not, with bias;
    the partial x tile's rows past M neither read nor write."""
    qweight, scales, qzeros, deq, x, bias = _problem(M, group, sym, K, N, M + K + N,
                                                     torch.bfloat16)  # fmt: skip
    out = _run(dev, x.to(torch.bfloat16), qweight, scales, qzeros, group,
               bias.to(torch.bfloat16), config=config)  # fmt: skip
    assert out.shape == (M, N) and out.dtype == torch.bfloat16
    assert rel_err(out, x.bfloat16().double() @ deq.double().t() + bias.double()) < 1e-2


@NEEDS_PTX
@pytest.mark.parametrize("M", [1, 5, 24])
def test_wna16_mma_fp16(dev, M):
    """fp16 activations and scales (the f16 magic numbers and MMA)."""
    qweight, scales, qzeros, deq, x, _ = _problem(M, 128, False, 512, 256, 3, torch.float16)
    out = _run(dev, x.half(), qweight, scales, qzeros, 128)
    assert out.dtype == torch.float16
    assert rel_err(out, x.half().double() @ deq.double().t()) < 1e-2


@NEEDS_PTX
@pytest.mark.parametrize("M", [1, 2])
def test_wna16_mma_long_k(dev, M):
    """A long K (≥ LONG_K): one row takes two column tiles a warp and up to 32 splits (here 17
    of 4 groups), their finish summing one row; two rows keep the short-K config."""
    from lowbit.kernels.triton.wna16_mma import LONG_K, _config

    K, N = 68 * 128, 192
    assert K >= LONG_K and _config(1, N, K, 128)["e"] == 2 and _config(2, N, K, 128)["e"] == 1
    qweight, scales, qzeros, deq, x, bias = _problem(M, 128, False, K, N, 13, torch.bfloat16)
    out = _run(dev, x.bfloat16(), qweight, scales, qzeros, 128, bias.bfloat16())
    ref = x.bfloat16().double() @ deq.double().t() + bias.bfloat16().double()
    assert rel_err(out, ref) < 1e-2


@NEEDS_PTX
def test_wna16_mma_exact_integers(dev):
    """q − z enters the MMA exactly: integer x and power-of-two scales give the exact sum."""
    K, N = 256, 128
    gen = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (K // 64, N), generator=gen, dtype=torch.int32)
    from gpu_util import pack_along_n

    qweight, qzeros = pack_along_n(codes, 4), pack_along_n(zeros, 4)
    scales = torch.full((K // 64, N), 0.25, dtype=torch.bfloat16)
    x = torch.randint(-3, 4, (3, K), generator=gen).to(torch.bfloat16)
    w = (codes - zeros.repeat_interleave(64, 0)).double() * 0.25  # (K, N)
    out = _run(dev, x, qweight, scales, qzeros, 64)
    assert torch.equal(out.double().cpu(), (x.double() @ w).bfloat16().double())


@NEEDS_PTX
def test_wna16_mma_act_order(dev):
    """Act-order: x columns read through `perm`, 3-D input."""
    qweight, scales, qzeros, deq, x, _ = _problem(2, 128, False, 384, 192, 5, torch.bfloat16)
    perm = torch.randperm(384, generator=torch.Generator().manual_seed(6))
    out = _run(dev, x.reshape(1, 2, 384).bfloat16(), qweight, scales, qzeros, 128, perm=perm)
    assert out.shape == (1, 2, 192)
    assert rel_err(out[0], x.bfloat16()[:, perm].double() @ deq.double().t()) < 1e-2


@NEEDS_PTX
def test_wna16_mma_graph_replay_equals_eager(dev):
    """CUDA-graph replay (split K, in-kernel finish) is bit-identical to the eager call."""
    from lowbit.kernels.mma16 import pack_mma16
    from lowbit.kernels.triton.wna16_mma import wna16_mma_gemm

    qweight, scales, qzeros, _, x, bias = _problem(1, 128, False, 4096, 1024, 9, torch.bfloat16)
    args = (
        pack_mma16(qweight.to(dev)),
        scales.to(dev),
        qzeros.to(dev),
        128,
        bias.to(dev).bfloat16(),
    )
    xs = x.to(dev, torch.bfloat16)
    eager = wna16_mma_gemm(xs, *args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        wna16_mma_gemm(xs, *args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = wna16_mma_gemm(xs, *args)
    xs.copy_(torch.randn_like(xs))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, wna16_mma_gemm(xs, *args))
    assert not torch.equal(out, eager)


@NEEDS_PTX
@pytest.mark.parametrize("M,dtype", [(1, torch.bfloat16), (64, torch.bfloat16),
                                     (65, torch.bfloat16), (200, torch.float16),
                                     (3, torch.float32)])  # fmt: skip
def test_dispatch_mma16(dev, M, dtype):
    """dispatch.wna16_gemm over the mma16 layout: the kernel up to WNA16_MMA_MAX_M rows, above it
    (and for fp32 activations) the weight dequantized from the layout and one dense GEMM."""
    from lowbit.kernels import dispatch
    from lowbit.kernels.mma16 import pack_mma16

    assert dispatch.wna16_mma_layout(dev, 256, 512, 128, 4)
    assert not dispatch.wna16_mma_layout(dev, 256, 512, 32, 4)
    qweight, scales, qzeros, deq, x, bias = _problem(M, 128, False, 512, 256, M, dtype)
    y = dispatch.wna16_gemm(x.to(dev, dtype), pack_mma16(qweight.to(dev)), scales.to(dev),
                            qzeros.to(dev), 128, 4, bias.to(dev, dtype))  # fmt: skip
    assert y.shape == (M, 256) and y.dtype == dtype
    ref = x.to(dtype).double() @ deq.double().t() + bias.to(dtype).double()
    assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("group,sym,K,N,dtype", [(128, False, 256, 128, torch.bfloat16),
                                                 (64, True, 192, 64, torch.float16),
                                                 (-1, False, 128, 192, torch.float32)])  # fmt: skip
def test_dequant_mma16(dev, group, sym, K, N, dtype):
    """The large-M path's dequantization from the mma16 layout gives the weight the canonical
    layout's reference gives (Triton only: runs in the interpreter too)."""
    from lowbit.kernels.mma16 import pack_mma16
    from lowbit.kernels.triton.wna16_mma import dequant_mma16

    qweight, scales, qzeros, deq, _, _ = _problem(1, group, sym, K, N, K + N, dtype)
    d = lambda t: None if t is None else t.to(dev)
    w = dequant_mma16(pack_mma16(qweight.to(dev)), d(scales), d(qzeros), group)
    assert w.shape == (N, K) and w.dtype == dtype
    ref = (deq.to(dtype) if dtype == torch.float32 else deq).double()
    assert rel_err(w, ref) < 1e-2
