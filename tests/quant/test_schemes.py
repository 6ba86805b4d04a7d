"""Every layout loads into its scheme and computes x @ W^T exactly as an independent float64
dequantization of the producer's tensors (formats.md); SQNR bounds per scheme on random linears."""

from __future__ import annotations

import pytest
import torch

from lowbit.quant.spec import ActQuant, PerBlock, PerChannel, PerGroup, PerTensor, QuantSpec
from tests.quant import writers
from tests.quant.helpers import build, load, rel, sqnr

N, K = 256, 256
torch.manual_seed(0)
W = torch.randn(N, K) / K**0.5
X = torch.randn(3, 5, K)
ACT_ORDER = torch.randperm(K) // 32  # a scattered g_idx: 32 columns per group


def _int(bits, g, sym, layout, order=False):
    gran = PerGroup(g) if g > 0 else PerChannel()
    return QuantSpec(f"int{bits}", gran, layout, symmetric=sym, act_order=order)


CASES = {
    # name: (spec, writer() -> (tensors, float64 W), SQNR floor in dB vs the float weight)
    "gptq_v1_w4g32_sym": (_int(4, 32, True, "gptq"), lambda: writers.gptq(W, 4, 32, True), 17),
    "gptq_v2_w4g64_asym": (
        _int(4, 64, False, "gptq_v2"),
        lambda: writers.gptq(W, 4, 64, False, v2=True),
        17,
    ),
    "gptq_v1_w3g32": (_int(3, 32, True, "gptq"), lambda: writers.gptq(W, 3, 32, True), 11),
    "gptq_v2_w2g32_asym": (
        _int(2, 32, False, "gptq_v2"),
        lambda: writers.gptq(W, 2, 32, False, v2=True),
        4,
    ),
    "gptq_v1_w8_channel": (_int(8, -1, True, "gptq"), lambda: writers.gptq(W, 8, K, True), 38),
    "gptq_act_order": (
        _int(4, 32, True, "gptq", order=True),
        lambda: writers.gptq(W, 4, 32, True, g_idx=ACT_ORDER),
        17,
    ),
    "awq_w4g64": (_int(4, 64, False, "awq"), lambda: writers.awq(W, 64), 17),
    "awq_gemv_w4g32": (_int(4, 32, False, "awq_gemv"), lambda: writers.awq_gemv(W, 32), 17),
    "awq_gemv_w4g128": (_int(4, 128, False, "awq_gemv"), lambda: writers.awq_gemv(W, 128), 16),
    "ct_pack_w4g128_sym": (
        _int(4, 128, True, "ct_pack"),
        lambda: writers.ct_pack(W, 4, 128, True),
        16,
    ),
    "ct_pack_w8_channel_asym": (
        _int(8, -1, False, "ct_pack"),
        lambda: writers.ct_pack(W, 8, K, False),
        38,
    ),
    "modelopt_int4_g128": (
        _int(4, 128, True, "modelopt_int4"),
        lambda: writers.modelopt_int4(W, 128),
        16,
    ),
    "fp8_tensor_w8a16": (
        QuantSpec("fp8_e4m3", PerTensor(), "scaled"),
        lambda: writers.fp8(W, "tensor"),
        28,
    ),
    "fp8_channel_w8a16": (
        QuantSpec("fp8_e4m3", PerChannel(), "scaled"),
        lambda: writers.fp8(W, "channel"),
        28,
    ),
    "fp8_block_w8a16": (
        QuantSpec("fp8_e4m3", PerBlock(128, 128), "scaled"),
        lambda: writers.fp8(W, "block"),
        28,
    ),
    "ct_nvfp4a16": (
        QuantSpec("fp4_e2m1", PerGroup(16), "ct_nvfp4", global_scale=True),
        lambda: writers.nvfp4(W, modelopt=False),
        16,
    ),
    "modelopt_nvfp4a16": (
        QuantSpec("fp4_e2m1", PerGroup(16), "modelopt_nvfp4", global_scale=True),
        lambda: writers.nvfp4(W, modelopt=True),
        16,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_layout_exact_and_sqnr(name):
    spec, write, floor = CASES[name]
    tensors, deq = write()
    layer, plan = build([spec], [N], K)
    load(layer, plan, [tensors])
    with torch.no_grad():
        y = layer(X)
    want = X.double() @ deq.t()
    assert rel(y, want) < 1e-5, name
    assert sqnr(y, X.double() @ W.double().t()) > floor


@pytest.mark.parametrize(
    "act, floor",
    [
        (ActQuant("fp8_e4m3", "dynamic_token"), 25),
        (ActQuant("fp8_e4m3", "dynamic_tensor"), 22),
    ],
)
def test_fp8_w8a8_sqnr(act, floor):
    tensors, _ = writers.fp8(W, "channel")
    layer, plan = build([QuantSpec("fp8_e4m3", PerChannel(), "scaled", act=act)], [N], K)
    load(layer, plan, [tensors])
    with torch.no_grad():
        assert sqnr(layer(X), X @ W.t()) > floor


def test_int8_w8a8_matches_per_token_simulation():
    tensors, deq = writers.int8_channel(W)
    act = ActQuant("int8", "dynamic_token", qmax=127.5)
    layer, plan = build([QuantSpec("int8", PerChannel(), "scaled", act=act)], [N], K)
    load(layer, plan, [tensors])
    x2 = X.reshape(-1, K).double()
    s = x2.abs().amax(1, keepdim=True) / 127.5  # compressed-tensors' divisor
    xq = (x2 / s).round().clamp(-128, 127) * s
    with torch.no_grad():  # float32 x / s may round a few near-.5 codes the other way
        assert rel(layer(X).reshape(-1, N), xq @ deq.t()) < 1e-3
        assert sqnr(layer(X), X @ W.t()) > 35


def test_fused_shards_with_different_specs_run_per_shard():
    """gate (int4 GPTQ) and up (int8 GPTQ) of one fused layer: no 'mixed bits' refusal."""
    t0, d0 = writers.gptq(W[:128], 4, 32, True)
    t1, d1 = writers.gptq(W[128:], 8, 64, True)
    specs = [_int(4, 32, True, "gptq"), _int(8, 64, True, "gptq")]
    layer, plan = build(specs, [128, 128], K, bias=True)
    assert "per-shard" in layer.scheme.describe()
    with torch.no_grad():
        layer.bias.copy_(torch.randn(N))
    layer.mark_loaded("bias", 0)
    layer.mark_loaded("bias", 1)
    load(layer, plan, [t0, t1])
    with torch.no_grad():
        want = X.double() @ torch.cat([d0, d1]).t() + layer.bias.double()
        assert rel(layer(X), want) < 1e-5


def test_fused_per_tensor_fp8_keeps_each_shards_scales():
    """Static per-tensor FP8 shards with their own weight and input scales stay exact."""
    act = ActQuant("fp8_e4m3", "static_tensor")
    spec = QuantSpec("fp8_e4m3", PerTensor(), "scaled", act=act)
    shards, wants = [], []
    for i, part in enumerate((W[:128] * 3, W[128:])):
        t, deq = writers.fp8(part, "tensor")
        t["input_scale"] = torch.tensor(0.01 * (i + 1))
        shards.append(t)
        xs = t["input_scale"].double()
        xq = (X.double() / xs).clamp(-448, 448).float().to(torch.float8_e4m3fn).double() * xs
        wants.append(xq @ deq.t())
    layer, plan = build([spec, spec], [128, 128], K)
    load(layer, plan, shards)
    with torch.no_grad():
        assert rel(layer(X), torch.cat(wants, -1)) < 1e-5


@pytest.mark.parametrize(
    "name", ["gptq_v2_w4g64_asym", "awq_w4g64", "ct_pack_w4g128_sym", "modelopt_int4_g128"]
)
def test_int4_layouts_repack_into_mma16(name, monkeypatch):
    """Where the GPU kernel runs (forced here), int4 weights of every format go on from the
    canonical layout into the mma16 one at load, and compute the same product (the CPU takes
    the reference over the unpacked codes; the kernel itself: tests/gpu/test_gpu_wna16_mma.py)."""
    from lowbit.kernels import dispatch

    monkeypatch.setattr(dispatch, "wna16_mma_layout", lambda *a: True)
    spec, write, _ = CASES[name]
    tensors, deq = write()
    layer, plan = build([spec], [N], K)
    load(layer, plan, [tensors])
    assert layer.qweight.shape == (N // 64, K // 16, 32, 4)  # the mma16 layout
    with torch.no_grad():
        y = layer(X)
    assert rel(y, X.double() @ deq.t()) < 1e-5, name
