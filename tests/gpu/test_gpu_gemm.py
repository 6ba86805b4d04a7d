"""Quantized GEMMs against float64 dequantized oracles on awkward shapes."""

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
MS = [1, 17, 128, 129]


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize(
    "bits,group,sym,K,N",
    [(4, 128, False, 384, 136), (4, 128, True, 256, 520), (4, 32, False, 160, 72),
     (8, 128, True, 384, 132), (4, -1, True, 192, 64), (4, 128, False, 2048, 200)],
)  # fmt: skip
def test_wna16_gemm(dev, M, bits, group, sym, K, N):
    """W4A16 / W8A16 group-wise, sym and asym, against the dequantized weight."""
    gen = torch.Generator().manual_seed(M + K + N)
    w = torch.randn(N, K, generator=gen)
    g = K if group == -1 else group
    qweight, scales, qzeros, deq = quantize_wna16(w, bits, g, sym)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    d = lambda t: None if t is None else t.to(dev)
    y = dispatch.wna16_gemm(
        x.to(dev, ACT_DTYPE), d(qweight), scales.to(dev, ACT_DTYPE), d(qzeros), group,
        bits, bias.to(dev, ACT_DTYPE),
    )  # fmt: skip
    assert y.shape == (M, N) and y.dtype == ACT_DTYPE
    ref = x.double() @ deq.double().t() + bias.double()
    assert rel_err(y, ref) < 1e-2


def test_wna16_gemm_act_order_perm(dev):
    """Act-order: x columns read through `perm` equal x[:, perm] @ W'."""
    gen = torch.Generator().manual_seed(3)
    K, N, M = 256, 128, 5
    w = torch.randn(N, K, generator=gen)
    qweight, scales, qzeros, deq = quantize_wna16(w, 4, 128, False)
    perm = torch.randperm(K, generator=gen)
    x = torch.randn(M, K, generator=gen)
    y = dispatch.wna16_gemm(
        x.to(dev, ACT_DTYPE), qweight.to(dev), scales.to(dev, ACT_DTYPE),
        qzeros.to(dev), 128, 4, None, perm.to(dev),
    )  # fmt: skip
    assert rel_err(y, x[:, perm].double() @ deq.double().t()) < 1e-2


# (bits, group, sym, K, N, config): N and K off the 128-wide tiles, G = 32 (bk 32) and
# per-channel, the plain (unswapped) MMA, and small tiles with a short GROUP_M.
TILED_CASES = [
    (4, 128, False, 384, 136, None),
    (8, 32, True, 160, 72, None),
    (4, -1, True, 192, 264, {"swap": 0}),
    (8, 64, False, 320, 4104, {"bm": 32, "bn": 64, "bk": 32, "group_m": 2}),
    (4, 128, True, 256, 520, {"bm": 64, "bn": 256, "bk": 128, "stages": 2, "swap": 0}),
]


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("bits,group,sym,K,N,config", TILED_CASES)
def test_wna16_gemm_tiled(dev, M, bits, group, sym, K, N, config):
    """The tiled dequantize-in-registers GEMM against the dequantized weight, with bias."""
    from lowbit.kernels.triton.wna16_tiled import wna16_gemm_tiled

    gen = torch.Generator().manual_seed(M + K + N)
    w = torch.randn(N, K, generator=gen)
    qweight, scales, qzeros, deq = quantize_wna16(w, bits, K if group == -1 else group, sym)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    d = lambda t: None if t is None else t.to(dev)
    y = wna16_gemm_tiled(
        x.to(dev, ACT_DTYPE), d(qweight), scales.to(dev, ACT_DTYPE), d(qzeros), group, bits,
        bias.to(dev, ACT_DTYPE), config=config,
    )  # fmt: skip
    assert y.shape == (M, N) and y.dtype == ACT_DTYPE
    assert rel_err(y, x.double() @ deq.double().t() + bias.double()) < 1e-2


@pytest.mark.parametrize("swap", [0, 1])
def test_wna16_gemm_tiled_act_order(dev, swap):
    """Act-order through `perm`, a 3-D input, no bias."""
    from lowbit.kernels.triton.wna16_tiled import wna16_gemm_tiled

    gen = torch.Generator().manual_seed(4)
    K, N, M = 256, 200, 33
    qweight, scales, qzeros, deq = quantize_wna16(torch.randn(N, K, generator=gen), 4, 64, False)
    perm = torch.randperm(K, generator=gen)
    x = torch.randn(M, K, generator=gen)
    y = wna16_gemm_tiled(
        x.reshape(3, 11, K).to(dev, ACT_DTYPE), qweight.to(dev), scales.to(dev, ACT_DTYPE),
        qzeros.to(dev), 64, 4, None, perm.to(dev), config={"swap": swap},
    )  # fmt: skip
    assert y.shape == (3, 11, N)
    assert rel_err(y.reshape(M, N), x[:, perm].double() @ deq.double().t()) < 1e-2


GEMV_KNOBS = [{"stages": 2, "unroll": 1}, {"block_k": 16, "chunk": 64, "stages": 3, "unroll": 1}]


@pytest.mark.parametrize("config", GEMV_KNOBS)
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize(
    "bits,group,sym,K,N", [(4, 128, False, 384, 136), (8, 64, True, 320, 2056)]
)
def test_wna16_gemv_knobs(dev, M, bits, group, sym, K, N, config):
    """The GEMV's pipelining knobs (stages, unrolled chunk loop) leave the result unchanged."""
    from lowbit.kernels.triton.wna16_gemv import wna16_gemv

    gen = torch.Generator().manual_seed(M + K)
    w = torch.randn(N, K, generator=gen)
    qweight, scales, qzeros, deq = quantize_wna16(w, bits, group, sym)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    d = lambda t: None if t is None else t.to(dev)
    y = wna16_gemv(
        x.to(dev, ACT_DTYPE), d(qweight), scales.to(dev, ACT_DTYPE), d(qzeros), group, bits,
        bias.to(dev, ACT_DTYPE), config=config,
    )  # fmt: skip
    assert y.shape == (M, N)
    assert rel_err(y, x.double() @ deq.double().t() + bias.double()) < 1e-2


def _fp8(dev):
    if not dispatch.fp8_mma_supported(dev):
        pytest.skip("FP8 MMA needs sm_89+")


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("static_act", [False, True])
@pytest.mark.parametrize("K", [272, 2048])
def test_fp8_scaled_mm(dev, M, per_channel, static_act, K):
    """FP8 W8A8 (per-tensor or per-channel weight; dynamic per-token or static activations);
    M ≤ dispatch.FP8_TRITON_MAX_M runs the split-K Triton kernel, larger M torch._scaled_mm."""
    _fp8(dev)
    gen = torch.Generator().manual_seed(M)
    N = 144
    w = torch.randn(N, K, generator=gen)
    ws = w.abs().amax(1, keepdim=True) / 448 if per_channel else w.abs().max().reshape(1) / 448
    wq = (w / ws).to(torch.float8_e4m3fn)
    x = torch.randn(M, K, generator=gen)
    xs = (x.abs().max() / 448).reshape(1) if static_act else None
    y = dispatch.fp8_scaled_mm(
        x.to(dev, ACT_DTYPE), wq.to(dev), ws.to(dev), None if xs is None else xs.to(dev)
    )
    ref = x.double() @ (wq.double() * ws.double()).t()
    assert y.shape == (M, N) and rel_err(y, ref) < 4e-2


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K", [272, 2048])
def test_w8a8_triton_fp8(dev, M, K):
    """The split-K Triton W8A8 kernel on FP8 weights (dispatch's small-M FP8 path when enabled)."""
    _fp8(dev)
    from lowbit.kernels.triton.w8a8_gemm import w8a8_gemm

    gen = torch.Generator().manual_seed(M + K)
    N = 144
    w = torch.randn(N, K, generator=gen)
    ws = w.abs().amax(1) / 448
    wq = (w / ws[:, None]).to(torch.float8_e4m3fn)
    x = torch.randn(M, K, generator=gen)
    y = w8a8_gemm(x.to(dev, ACT_DTYPE), wq.to(dev), ws.to(dev))
    ref = x.double() @ (wq.double() * ws.double()[:, None]).t()
    assert y.shape == (M, N) and rel_err(y, ref) < 4e-2


@pytest.mark.parametrize("M", MS)
def test_fp8_block_gemm(dev, M):
    """128×128 block FP8 with N not a multiple of the block."""
    _fp8(dev)
    gen = torch.Generator().manual_seed(M + 7)
    K, N = 384, 200
    w = torch.randn(N, K, generator=gen)
    nb = -(-N // 128)
    wp = torch.nn.functional.pad(w, (0, 0, 0, nb * 128 - N)).reshape(nb, 128, K // 128, 128)
    ws = wp.abs().amax((1, 3)) / 448  # (nb, K / 128)
    wq = (wp / ws[:, None, :, None]).reshape(nb * 128, K)[:N].to(torch.float8_e4m3fn)
    deq = wq.double().reshape(-1, K)
    deq = deq * ws.double().repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)
    x = torch.randn(M, K, generator=gen)
    y = dispatch.fp8_block_gemm(x.to(dev, ACT_DTYPE), wq.to(dev), ws.to(dev))
    assert y.shape == (M, N) and rel_err(y, x.double() @ deq.t()) < 4e-2


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("static_act", [False, True])
@pytest.mark.parametrize("K", [320, 2048])  # 2048: split-K at small M
def test_int8_gemm(dev, M, static_act, K):
    """INT8 W8A8 per-channel weight, per-token (or static) activations, bias in the epilogue."""
    gen = torch.Generator().manual_seed(M + 11)
    N = 136
    w = torch.randn(N, K, generator=gen)
    ws = w.abs().amax(1) / 127
    wq = (w / ws[:, None]).round().clamp(-127, 127).to(torch.int8)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    xs = (x.abs().max() / 127).reshape(1) if static_act else None
    y = dispatch.int8_gemm(
        x.to(dev, ACT_DTYPE), wq.to(dev), ws.to(dev), None if xs is None else xs.to(dev),
        bias.to(dev, ACT_DTYPE),
    )  # fmt: skip
    ref = x.double() @ (wq.double() * ws.double()[:, None]).t() + bias.double()
    assert y.shape == (M, N) and rel_err(y, ref) < 3e-2


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("group", [None, 128])
def test_act_quant_round_trip(dev, dtype, group):
    """codes · scale reproduce x; scales are absmax / qmax per (row, group)."""
    if dtype != torch.int8:
        _fp8(dev)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(17, 384, generator=gen)
    x[3] = 0  # an all-zero row must not divide by zero
    q, s = dispatch.act_quant(x.to(dev, ACT_DTYPE), dtype, group)
    g = group or 384
    deq = q.float().cpu().reshape(17, -1, g) * s.cpu()[..., None]
    assert not torch.isnan(deq).any()
    assert rel_err(deq.reshape(17, 384), x.bfloat16().float()) < 3e-2


@pytest.mark.parametrize("M", [64, 200])
def test_dispatch_takes_tiled_for_wide_int4(dev, M):
    """Wide int4 weights at medium M route to the tiled kernel (dispatch._wna16_op) and match."""
    K, N = 256, 128 * dispatch.WNA16_TILED_MIN_TILES
    assert dispatch._wna16_op(M, N, 4)[0] == "wna16_tiled"
    gen = torch.Generator().manual_seed(M)
    w = torch.randn(N, K, generator=gen)
    qweight, scales, qzeros, deq = quantize_wna16(w, 4, 128, False)
    x = torch.randn(M, K, generator=gen)
    y = dispatch.wna16_gemm(x.to(dev, ACT_DTYPE), qweight.to(dev), scales.to(dev, ACT_DTYPE),
                            qzeros.to(dev), 128, 4)  # fmt: skip
    assert rel_err(y, x.double() @ deq.double().t()) < 1e-2
