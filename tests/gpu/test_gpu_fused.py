"""Fused RMSNorm(+residual), rotary and SiLU·mul against the reference ops (the CPU path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_util import ACT_DTYPE, gpu_device, interpreter_scalar_index, rel_err  # noqa: F401

from lowbit.kernels import dispatch, reference
from lowbit.layers.norm import RMSNorm
from lowbit.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("T", [1, 17, 129])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("early_weight", [False, True])
def test_rms_norm(dev, monkeypatch, T, with_residual, early_weight):
    """RMSNorm.forward (now the fused kernel) == the reference, with and without the residual,
    the weight loaded before or after the PDL wait."""
    from lowbit.kernels.triton import rms_norm

    monkeypatch.setattr(rms_norm, "EARLY_WEIGHT", early_weight)
    gen = torch.Generator().manual_seed(T)
    N = 4000  # not a power of two
    norm = RMSNorm(N, 1e-5, ACT_DTYPE).to(dev)
    norm.weight.data.copy_(torch.randn(N, generator=gen))
    x = torch.randn(T, N, generator=gen).to(dev, ACT_DTYPE)
    r = torch.randn(T, N, generator=gen).to(dev, ACT_DTYPE) if with_residual else None
    got = norm(x, r)
    ref = reference.rms_norm(x, norm.weight, norm.eps, r)
    if with_residual:
        assert rel_err(got[0], ref[0]) < 1e-2 and torch.equal(got[1], ref[1])
    else:
        assert rel_err(got, ref) < 1e-2


@pytest.mark.parametrize("T", [1, 17, 129])
def test_rotary(dev, T):
    """RotaryEmbedding.forward (llama3 scaling, fused kernel) == the reference op."""
    gen = torch.Generator().manual_seed(T)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    rope = RotaryEmbedding(128, 512, 500000.0, scaling).to(dev)
    pos = torch.randint(0, 512, (T,), generator=gen).to(dev)
    qkv = torch.randn(T, 12 * 128, generator=gen).to(dev, ACT_DTYPE)
    q = qkv[:, : 8 * 128].view(T, 8, 128)  # strided views, as the model passes them
    k = qkv[:, 8 * 128 : 10 * 128].view(T, 2, 128)
    gq, gk = rope(pos, q, k)
    rq, rk = reference.rotary(pos, q, k, rope.cos, rope.sin)
    assert rel_err(gq, rq) < 1e-2 and rel_err(gk, rk) < 1e-2


@pytest.mark.parametrize("T", [1, 17, 129])
def test_silu_mul(dev, T):
    """silu(gate) · up from a fused [gate | up] row."""
    x = torch.randn(T, 2 * 1500, device=dev, dtype=ACT_DTYPE)
    gate, up = x.chunk(2, dim=-1)
    assert rel_err(dispatch.silu_mul(x), F.silu(gate) * up) < 1e-2


QUANTS = [(torch.float8_e4m3fn, 448.0), (torch.int8, 127.0), (torch.int8, 127.5)]


def _needs_fusion(dev, quant):
    if not dispatch.fuses_act_quant(dev, quant[0]):
        pytest.skip(f"no fused {quant[0]} quantization here (fp8: sm_89+)")


@pytest.mark.parametrize("T", [1, 17])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("quant", QUANTS)
def test_rms_norm_quant_equals_norm_then_act_quant(dev, T, with_residual, quant):
    """The norm with a quantized output (what a W8A8 qkv / gate_up takes) gives the codes and
    scales that act_quant gives from the unquantized norm output, bit for bit, and the same
    residual."""
    _needs_fusion(dev, quant)
    gen = torch.Generator().manual_seed(T)
    N = 4000
    norm = RMSNorm(N, 1e-5, ACT_DTYPE).to(dev)
    norm.weight.data.copy_(torch.randn(N, generator=gen))
    x = torch.randn(T, N, generator=gen).to(dev, ACT_DTYPE)
    r = torch.randn(T, N, generator=gen).to(dev, ACT_DTYPE) if with_residual else None
    got = norm(x, r, quant=quant)
    plain = norm(x, r)
    qa, y = (got[0], plain[0]) if with_residual else (got, plain)
    assert isinstance(qa, dispatch.QuantizedActivation) and qa.dtype == ACT_DTYPE
    q, s = dispatch.act_quant(y, quant[0], None, quant[1])
    assert torch.equal(qa.q.view(torch.int8), q.view(torch.int8))
    assert torch.equal(qa.scale, s)
    if with_residual:
        assert torch.equal(got[1], plain[1])


@pytest.mark.parametrize("T", [1, 17])
@pytest.mark.parametrize("quant", QUANTS)
def test_silu_mul_quant_equals_silu_mul_then_act_quant(dev, T, quant):
    _needs_fusion(dev, quant)
    x = torch.randn(T, 2 * 1500, device=dev, dtype=ACT_DTYPE)
    qa = dispatch.silu_mul(x, quant)
    q, s = dispatch.act_quant(dispatch.silu_mul(x), quant[0], None, quant[1])
    assert torch.equal(qa.q.view(torch.int8), q.view(torch.int8))
    assert torch.equal(qa.scale, s) and qa.shape == (T, 1500)


@pytest.mark.parametrize("wdtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("T", [1, 40])
def test_w8a8_gemm_takes_quantized_activation(dev, wdtype, T):
    """A W8A8 GEMM given the producer's codes equals the GEMM that quantizes x itself (the
    GEMV at T = 1, the tensor-core / cuBLAS paths above)."""
    if wdtype != torch.int8 and not dispatch.fp8_mma_supported(dev):
        pytest.skip("fp8 needs sm_89+")
    gen = torch.Generator().manual_seed(T)
    K, N = 512, 264
    w = torch.randn(N, K, generator=gen)
    qmax = 127.0 if wdtype == torch.int8 else 448.0
    ws = w.abs().amax(1) / qmax
    wq = (w / ws[:, None]).clamp(-qmax, qmax)
    wq = (wq.round() if wdtype == torch.int8 else wq).to(wdtype).to(dev)
    x = torch.randn(T, K, generator=gen).to(dev, ACT_DTYPE)
    gemm = dispatch.int8_gemm if wdtype == torch.int8 else dispatch.fp8_scaled_mm
    plain = gemm(x, wq, ws.to(dev))
    qa = dispatch.QuantizedActivation(*dispatch.act_quant(x, wdtype), ACT_DTYPE)
    fused = gemm(qa, wq, ws.to(dev))
    # the same codes and scales: equal up to the GEMM's own run-to-run rounding (cuBLASLt may
    # choose another algorithm); a wrong scale or code would be off by far more
    assert fused.dtype == plain.dtype == ACT_DTYPE and rel_err(fused, plain) < 1e-3


@pytest.mark.parametrize("T", [1, 17])
@pytest.mark.parametrize("quant", QUANTS)
def test_silu_mul_defers_quantization_at_one_row(dev, monkeypatch, T, quant):
    """At one row a quantized SwiGLU returns its values and per-program absmaxes (the GEMV
    quantizes), at more rows the codes; either way `q` / `scale` are act_quant's."""
    from lowbit.kernels.triton import silu_mul

    _needs_fusion(dev, quant)
    monkeypatch.setattr(silu_mul, "DEFER_DTYPES", (torch.int8, torch.float8_e4m3fn))
    x = torch.randn(T, 2 * 3000, device=dev, dtype=ACT_DTYPE)
    qa = dispatch.silu_mul(x, quant)
    h = dispatch.silu_mul(x)
    deferred = isinstance(qa, dispatch.DeferredQuant)
    assert deferred == (T == 1)
    monkeypatch.setattr(silu_mul, "DEFER_DTYPES", ())
    assert not isinstance(dispatch.silu_mul(x, quant), dispatch.DeferredQuant)
    if deferred:
        assert torch.equal(qa.x, h) and qa.amax.shape == (1, 3)  # 3 programs of 1024
        assert torch.equal(qa.amax.amax(1), h.float().abs().amax(1))
        assert (qa.qdtype, qa.qmax) == quant and qa.dtype == ACT_DTYPE
    q, s = dispatch.act_quant(h, quant[0], None, quant[1])
    assert torch.equal(qa.q.view(torch.int8), q.view(torch.int8)) and torch.equal(qa.scale, s)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("K", [1536, 1000])  # even tiles; a K past the last tile (masked)
@pytest.mark.parametrize("bn", [4, 8, 16])
def test_w8a8_gemv_quantizes_deferred_input(dev, monkeypatch, quant, K, bn):
    """The GEMV given SwiGLU's deferred output (16-bit values, partial absmaxes) gives the bits
    it gives for the codes act_quant writes: the same codes, quantized as it loads them —
    through dispatch (the served config: 4-row programs for these 264 rows) and with 8- and
    16-row programs."""
    from lowbit.kernels.triton import silu_mul, w8a8_gemm
    from lowbit.kernels.triton.w8a8_gemv import w8a8_gemv

    _needs_fusion(dev, quant)
    monkeypatch.setattr(silu_mul, "DEFER_DTYPES", (torch.int8, torch.float8_e4m3fn))
    wdtype, qmax = quant
    gen = torch.Generator().manual_seed(K)
    N = 264
    w = torch.randn(N, K, generator=gen)
    ws = w.abs().amax(1) / qmax
    wq = (w / ws[:, None]).clamp(-qmax, qmax)
    wq = (wq.round() if wdtype == torch.int8 else wq).to(wdtype).to(dev)
    gate_up = (3 * torch.randn(1, 2 * K, generator=gen)).to(dev, ACT_DTYPE)
    bias = torch.randn(N, generator=gen).to(dev, ACT_DTYPE)
    deferred = dispatch.silu_mul(gate_up, quant)
    assert isinstance(deferred, dispatch.DeferredQuant)
    q, s = dispatch.act_quant(dispatch.silu_mul(gate_up), wdtype, None, qmax)
    gemm = dispatch.int8_gemm if wdtype == torch.int8 else dispatch.fp8_scaled_mm
    config = {**w8a8_gemm.gemv_config(N), "bn": bn}
    for b in (None, bias):
        if config == w8a8_gemm.gemv_config(N):
            got = gemm(deferred, wq, ws.to(dev), bias=b)
        else:
            got = w8a8_gemv(deferred, None, wq, ws.to(dev), b, ACT_DTYPE, config)
        want = w8a8_gemv(q, s, wq, ws.to(dev), b, ACT_DTYPE, config)
        assert got.dtype == ACT_DTYPE and torch.equal(got, want)
        ref = (q.float() @ wq.float().t()) * s * ws.to(dev) + (0 if b is None else b.float())
        assert rel_err(got, ref) < 1e-2
