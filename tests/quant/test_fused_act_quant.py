"""W8A8 linears with dynamic per-token inputs ask their producer (RMSNorm, SwiGLU) for
quantized activations (`Linear.input_quant`); the GEMMs take them as they are. On the CPU the
fusion is off by default; here it is forced on, so the layers hand QuantizedActivations through
the reference ops, and the logits must equal the unfused engine's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny import make_tokenizer

import lowbit
from lowbit.kernels import dispatch, reference
from lowbit.quant.schemes.w8a8_fp8 import FP8Scheme
from lowbit.quant.schemes.w8a8_int8 import Int8Scheme
from lowbit.quant.spec import ActQuant, PerBlock, PerChannel, PerTensor, QuantSpec

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "quant"


@pytest.mark.parametrize(
    "scheme, want",
    [
        (FP8Scheme(QuantSpec("fp8_e4m3", PerChannel(), "scaled",
                             act=ActQuant("fp8_e4m3", "dynamic_token"))),
         (torch.float8_e4m3fn, 448.0)),
        (Int8Scheme(QuantSpec("int8", PerChannel(), "scaled",
                              act=ActQuant("int8", "dynamic_token", qmax=127.5))),
         (torch.int8, 127.5)),
        (FP8Scheme(QuantSpec("fp8_e4m3", PerTensor(), "scaled",
                             act=ActQuant("fp8_e4m3", "static_tensor"))), None),
        (FP8Scheme(QuantSpec("fp8_e4m3", PerTensor(), "scaled",
                             act=ActQuant("fp8_e4m3", "dynamic_tensor"))), None),
        (FP8Scheme(QuantSpec("fp8_e4m3", PerBlock(128, 128), "scaled",
                             act=ActQuant("fp8_e4m3", "dynamic_group", group_size=128))), None),
        (FP8Scheme(QuantSpec("fp8_e4m3", PerChannel(), "scaled")), None),
        (Int8Scheme(QuantSpec("int8", PerChannel(), "scaled", pre_quant_scale=True,
                              act=ActQuant("int8", "dynamic_token"))), None),
    ],
)  # fmt: skip
def test_which_schemes_take_quantized_inputs(scheme, want):
    assert scheme.fused_input_quant() == want


@pytest.mark.parametrize("name", ["ct_fp8_dynamic", "ct_int8_w8a8"])
def test_fused_plumbing_gives_the_unfused_logits(name, tmp_path, monkeypatch):
    model_dir = tmp_path / name
    shutil.copytree(FIXTURES / name, model_dir)
    make_tokenizer(model_dir, 384)
    ids = torch.load(model_dir / "reference.pt")["ids"].tolist()
    seen = []
    with lowbit.Engine(model_path=str(model_dir), dtype="float32", device="cpu") as engine:
        plain = engine.logits(ids)
        monkeypatch.setattr(dispatch, "fuses_act_quant", lambda device, qdtype: True)
        monkeypatch.setattr(reference, "w8a8_codes_gemm", _counting(seen))
        fused = engine.logits(ids)
    assert seen, "no layer took a quantized activation"
    assert torch.allclose(fused, plain, rtol=1e-4, atol=1e-4), (fused - plain).abs().max()


def _counting(seen):
    real = reference.w8a8_codes_gemm

    def w8a8_codes_gemm(q, *args):
        seen.append(q.dtype)
        return real(q, *args)

    return w8a8_codes_gemm


def test_fusion_only_where_the_gemm_quantizes_the_same_way(monkeypatch):
    """No fusion on the CPU; fp8 fusion only on GPUs with FP8 GEMMs (sm_89+), int8 on any
    Triton device; LOWBIT_FUSE_ACT_QUANT=0 (FUSE_ACT_QUANT) turns it off."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not dispatch.fuses_act_quant(cpu, torch.int8)
    monkeypatch.setattr(dispatch, "use_triton", lambda device: True)
    for cap, fp8 in (((8, 0), False), ((9, 0), True)):
        monkeypatch.setattr(dispatch, "capability", lambda index=0, _c=cap: _c)
        assert dispatch.fuses_act_quant(cuda, torch.int8)
        assert dispatch.fuses_act_quant(cuda, torch.float8_e4m3fn) == fp8
    monkeypatch.setattr(dispatch, "FUSE_ACT_QUANT", False)
    assert not dispatch.fuses_act_quant(cuda, torch.int8)
