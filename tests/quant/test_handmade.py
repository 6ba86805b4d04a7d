"""Formats no tool here produces on CPU, written by hand per formats.md (tests/quant/writers.py):
DeepSeek-style block FP8 (`weight_scale_inv`, F32 or F8_E8M0 scales), AutoFP8 per-tensor
static FP8, ModelOpt NVFP4 (W4A16 and W4A4) and ModelOpt MXFP8 (ModelOpt fake-quantizes both
only on CUDA).
The reference is transformers' model holding the float64-dequantized weights, with the
format's activation quantization applied in float64 by forward pre-hooks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_tiny_model

import lowbit
from lowbit.kernels.codes import e8m0_ceil
from lowbit.quant.inspect import format_plan
from tests.quant import writers

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _against(model, d, method: str) -> tuple[float, float]:
    """lowbit (float32, CPU) on checkpoint `d` vs the reference `model`: relative error, top-1."""
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.cat([model(r[None]).logits for r in ids])
    with lowbit.Engine(model_path=str(d), dtype="float32", device="cpu") as engine:
        assert engine.quant_plan.method == method
        out = engine.logits(ids.tolist())
    top1 = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    return float((out - ref).norm() / ref.norm()), top1


def _fake_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x quantized to fp8 with a broadcastable float64 scale, and back."""
    return (x.double() / scale).clamp(-448, 448).float().to(torch.float8_e4m3fn).double() * scale


def _block_act(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token, per-128-channel fp8 (DeepSeek's act_quant)."""
    g = x.double().reshape(*x.shape[:-1], -1, 128)
    s = g.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 448
    return _fake_fp8(g, s).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("variant", ["block", "block_e8m0", "tensor_static"])
def test_fp8_checkpoint_written_by_hand(variant, tmp_path):
    d = tmp_path / variant
    model = make_tiny_model(d, "llama", head_dim=64, hidden_size=128, intermediate_size=256)
    sd = load_file(d / "model.safetensors")
    acts = {}
    for name in [n for n in sd if n.endswith(".weight") and n.split(".")[-2] in LINEARS]:
        module = name[: -len(".weight")]
        w = sd[name]
        if variant.startswith("block"):
            t, deq = writers.fp8(w, "block")
            if variant == "block_e8m0":  # ue8m0 scales: powers of two stored as F8_E8M0
                p2 = torch.exp2(torch.ceil(torch.log2(t["weight_scale"].double())))
                q = w.double() / p2.repeat_interleave(128, 0).repeat_interleave(128, 1)
                t["weight"] = q.clamp(-448, 448).float().to(torch.float8_e4m3fn)
                deq = t["weight"].double() * p2.repeat_interleave(128, 0).repeat_interleave(128, 1)
                t["weight_scale"] = p2.float().to(torch.float8_e8m0fnu)
            sd[name], sd[f"{module}.weight_scale_inv"] = t["weight"], t["weight_scale"]
            acts[module] = _block_act
        else:
            t, deq = writers.fp8(w, "tensor")
            xs = torch.tensor(0.02)
            sd[name], sd[f"{module}.weight_scale"] = t["weight"], t["weight_scale"].reshape(())
            sd[f"{module}.input_scale"] = xs
            acts[module] = lambda x, xs=xs: _fake_fp8(x, xs.double()).to(x.dtype)
        model.get_submodule(module).weight.data = deq.float()
    save_file(sd, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = (
        {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        if variant.startswith("block")
        else {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    )
    (d / "config.json").write_text(json.dumps(cfg))
    for module, fn in acts.items():
        model.get_submodule(module).register_forward_pre_hook(lambda m, a, fn=fn: (fn(a[0]),))
    assert _against(model, d, "fp8")[0] < 2e-3


def _nvfp4_act(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """ModelOpt NVFP4 activations in float64: fp8 block scales amax16 / (6 · input_scale)."""
    g = x.double().reshape(*x.shape[:-1], -1, 16)
    bs = (g.abs().amax(-1, keepdim=True) / (6 * input_scale)).float().to(torch.float8_e4m3fn)
    scale = bs.double() * input_scale
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    mags = torch.tensor(writers.E2M1, dtype=torch.float64)
    v = (g / safe).clamp(-6, 6)
    idx = (v.abs()[..., None] - mags).abs().argmin(-1)  # nearest; ties are measure-zero here
    return (torch.copysign(mags[idx], v) * scale).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("algo", ["W4A16_NVFP4", "NVFP4"])
def test_modelopt_nvfp4_written_by_hand(algo, tmp_path):
    """ModelOpt NVFP4 needs CUDA to produce; this checkpoint follows formats.md §5.4 instead."""
    d = tmp_path / algo
    model = make_tiny_model(d, "llama", head_dim=64, hidden_size=128, intermediate_size=256)
    sd = load_file(d / "model.safetensors")
    for name in [n for n in sd if n.endswith(".weight") and n.split(".")[-2] in LINEARS]:
        module = name[: -len(".weight")]
        t, deq = writers.nvfp4(sd[name], modelopt=True)
        sd[name] = t["weight"]
        sd[f"{module}.weight_scale"] = t["weight_scale"]
        sd[f"{module}.weight_scale_2"] = t["weight_scale_2"].reshape(())
        model.get_submodule(module).weight.data = deq.float()
        if algo == "NVFP4":
            xs = torch.tensor(0.004)
            sd[f"{module}.input_scale"] = xs
            model.get_submodule(module).register_forward_pre_hook(
                lambda m, a, xs=xs: (_nvfp4_act(a[0], xs.double()),)
            )
    save_file(sd, str(d / "model.safetensors"))
    quant = {"quant_algo": algo, "group_size": 16, "exclude_modules": ["lm_head"]}
    hf = {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": quant}
    (d / "hf_quant_config.json").write_text(json.dumps(hf))
    assert _against(model, d, "modelopt")[0] < 2e-3


def _mx_act(x: torch.Tensor) -> torch.Tensor:
    """ModelOpt MXFP8 activations in float64: per row and 32 inputs, scale 2^ceil(log2(amax/448))
    (1 for an all-zero block), e4m3 codes (tensor_quant_mx.cu `compute_scale_e8m0_NV`)."""
    g = x.double().reshape(*x.shape[:-1], -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    s = torch.exp2(torch.ceil(torch.log2(amax / 448)).clamp(-127, 127))
    s = torch.where(amax > 0, s, torch.ones_like(s))
    return _fake_fp8(g, s).reshape(x.shape).to(x.dtype)


def _mxfp8_checkpoint(d, where: str):
    """A tiny Llama written as ModelOpt 0.47 exports MXFP8 (see lowbit/quant/formats/modelopt.py),
    and transformers' model holding the dequantized weights with MX activations as pre-hooks."""
    model = make_tiny_model(d, "llama", head_dim=64, hidden_size=128, intermediate_size=256)
    sd = load_file(d / "model.safetensors")
    for name in [n for n in sd if n.endswith(".weight") and n.split(".")[-2] in LINEARS]:
        module = name[: -len(".weight")]
        t, deq = writers.mxfp8(sd[name])
        sd[name], sd[f"{module}.weight_scale"] = t["weight"], t["weight_scale"]
        model.get_submodule(module).weight.data = deq.float()
        model.get_submodule(module).register_forward_pre_hook(lambda m, a: (_mx_act(a[0]),))
    save_file(sd, str(d / "model.safetensors"))
    # Exactly what ModelOpt 0.47's export_hf_checkpoint wrote for a tiny Llama (checked once on
    # CPU with its CUDA MX activation kernel replaced; `writers.mxfp8` gave identical bytes).
    ignore = ["lm_head", "model.embed_tokens"]
    producer = {"name": "modelopt", "version": "0.47.0"}
    if where == "hf_quant_config":
        quant = {"quant_algo": "MXFP8", "kv_cache_quant_algo": None, "group_size": 32,
                 "exclude_modules": ignore}  # fmt: skip
        (d / "hf_quant_config.json").write_text(
            json.dumps({"producer": producer, "quantization": quant})
        )
    else:  # config.json's flat block: no group_size, `ignore` for exclude_modules
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"] = {"ignore": ignore, "quant_algo": "MXFP8",
                                      "producer": producer, "quant_method": "modelopt"}  # fmt: skip
        (d / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize("where", ["hf_quant_config", "config_json"])
def test_modelopt_mxfp8_written_by_hand(where, tmp_path):
    """ModelOpt MXFP8 (e4m3 + e8m0 per 1×32 weights, MX activations) against float64 numerics."""
    d = tmp_path / where
    model = _mxfp8_checkpoint(d, where)
    err, top1 = _against(model, d, "modelopt")
    assert err <= 0.01 and top1 >= 0.95, (err, top1)
    text = format_plan(d)
    assert "model.layers.0.self_attn.qkv_proj" in text
    assert "fp8_e4m3 group32 scale=e8m0 sym act=fp8_e4m3 dynamic_group32 e8m0" in text
    assert "mxfp8 (W8A8" in text and "reference.mxfp8_gemm" in text


def test_modelopt_mxfp8_bad_scale_names_the_tensor(tmp_path):
    """A weight_scale of the wrong shape fails while the plan is made, naming the tensor."""
    d = tmp_path / "bad"
    _mxfp8_checkpoint(d, "hf_quant_config")
    sd = load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight_scale"
    sd[name] = sd[name][:, :4].contiguous()  # (128, 8) → (128, 4): one scale per 64 inputs
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{name} is U8 \[128, 4\].*shape \[128, 8\]"):
        lowbit.Engine(model_path=str(d), dtype="float32", device="cpu")


def test_e8m0_ceil_is_exact_at_powers_of_two():
    """RCEIL exponents: exact powers of two keep theirs, a hair above rounds up, 0 → byte 0."""
    x = torch.tensor([1.0, 1.0 + 2**-23, 1.0 - 2**-24, 2.0**-130, 0.0, 3.0 * 2**120, 448.0 / 448])
    want = [127, 128, 127, 0, 0, 249, 127]  # 2^-130 clamps to 2^-127; 3·2^120 → 2^122
    assert e8m0_ceil(x).tolist() == want
