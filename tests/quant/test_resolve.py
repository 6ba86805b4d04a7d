"""Detection with no flag, per-module decisions, `--quantization` overrides, KV-cache scales,
`lowbit inspect`, and bad checkpoints failing with messages that name the tensor or the flag."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_tokenizer

import lowbit
from lowbit.config import ModelConfig
from lowbit.quant.formats.base import TensorIndex, ct_match, substring_match, wildcard_match
from lowbit.quant.formats.gptq import dynamic_override
from lowbit.quant.inspect import format_plan
from lowbit.quant.resolve import resolve_plan

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "quant"


def _copy(name: str, tmp_path: Path) -> Path:
    """A writable copy of a committed fixture, with a tokenizer."""
    d = tmp_path / name
    shutil.copytree(ROOT / name, d)
    make_tokenizer(d, 384)
    return d


def _plan(d: Path, quantization: str | None = None):
    return resolve_plan(d, ModelConfig.from_dir(d), quantization)


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(d: Path, fn) -> None:
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, str(d / "model.safetensors"))


def test_matching_semantics():
    assert ct_match("model.layers.0.mlp.gate", "re:.*mlp.gate$")
    assert ct_match("model.layers.0.q_proj", "Linear") and not ct_match("lm_head", "head")
    assert wildcard_match("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.gate*")
    assert substring_match("model.visual.blocks.0", "visual")
    dyn = {r"-:.*o_proj": {}, r"+:.*v_proj": {"bits": 8}}
    assert dynamic_override(dyn, "m.o_proj") is None
    assert dynamic_override(dyn, "m.v_proj") == {"bits": 8}
    assert dynamic_override(dyn, "m.q_proj") == {}


@pytest.mark.parametrize(
    "name, method",
    [
        ("ct_fp8_dynamic", "compressed-tensors"),
        ("gptq_w4g32_actorder", "gptq"),
        ("autoround_awq_w4g32", "awq"),  # auto-round writes quant_method awq for auto_awq
        ("autoround_mixed", "auto-round"),
        ("modelopt_fp8", "modelopt"),
        ("bnb_nf4_dq", "bitsandbytes"),
    ],
)
def test_detected_with_no_flag(name, method, tmp_path):
    assert _plan(_copy(name, tmp_path)).method == method


def test_side_files_in_resolution_order(tmp_path):
    """No config.json block: quantize_config.json (GPTQ), hf_quant_config.json (ModelOpt)."""
    d = _copy("gptq_w3g32", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    qcfg = cfg.pop("quantization_config")
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "quantize_config.json").write_text(json.dumps({k: v for k, v in qcfg.items()
                                                         if k != "quant_method"}))  # fmt: skip
    assert _plan(d).method == "gptq"
    m = _copy("modelopt_int4_awq", tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    cfg.pop("quantization_config")
    (m / "config.json").write_text(json.dumps(cfg))
    plan = _plan(m)
    assert plan.method == "modelopt" and "W4A16_AWQ" in plan.description


def test_mixed_precision_specs(tmp_path):
    plan = _plan(_copy("gptq_dynamic_mixed", tmp_path))
    assert plan.spec_of("model.layers.0.self_attn.v_proj").bits == 8
    assert plan.spec_of("model.layers.0.self_attn.q_proj").bits == 4
    assert plan.spec_of("model.layers.0.self_attn.o_proj") is None  # `-:` skip
    assert "per-shard" in plan.scheme_for("x.qkv_proj", [
        f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]).describe()  # fmt: skip
    ar = _plan(_copy("autoround_mixed", tmp_path))
    assert ar.spec_of("model.layers.1.mlp.down_proj") is None  # extra_config bits 16


@pytest.mark.parametrize(
    "name, flag",
    [
        ("ct_fp8_dynamic", "w8a8_fp8"),
        ("ct_int8_w8a8", "w8a8_int8"),
        ("modelopt_fp8", "modelopt_fp8"),
        ("modelopt_fp8", "modelopt"),
        ("gptq_w3g32", "gptq"),
        ("ct_w8a16", "compressed-tensors"),
        ("autoround_awq_w4g32", "auto-round"),  # an AWQ export by auto-round
    ],
)
def test_compatible_overrides_accepted(name, flag, tmp_path):
    assert _plan(_copy(name, tmp_path), flag).method is not None


@pytest.mark.parametrize(
    "name, flag, words",
    [
        ("ct_fp8_static", "w8a8_int8", ["compressed-tensors", "--quantization compressed-tensors"]),
        ("gptq_w3g32", "awq", ["GPTQ", "--quantization gptq"]),
        ("modelopt_int4_awq", "modelopt_fp4", ["ModelOpt W4A16_AWQ", "--quantization modelopt"]),
    ],
)
def test_incompatible_override_names_checkpoint_and_fix(name, flag, words, tmp_path):
    with pytest.raises(ValueError, match=f"--quantization {flag} does not fit") as e:
        _plan(_copy(name, tmp_path), flag)
    assert all(w in str(e.value) for w in words)


def test_full_precision_flags(tmp_path):
    d = tmp_path / "fp"
    from tiny import make_tiny_model

    make_tiny_model(d)
    cfg = ModelConfig.from_dir(d)
    assert resolve_plan(d, cfg).method is None
    assert resolve_plan(d, cfg, "fp8").method == "fp8"  # online (tests/test_online_quant.py)
    with pytest.raises(ValueError, match="gptq on the full-precision .* needs calibration"):
        resolve_plan(d, cfg, "gptq")
    with pytest.raises(ValueError, match="needs a modelopt checkpoint"):
        resolve_plan(d, cfg, "modelopt")
    with pytest.raises(ValueError, match="unknown --quantization 'nope'"):
        resolve_plan(d, cfg, "nope")


def test_unknown_quant_method(tmp_path):
    d = _copy("ct_w8a16", tmp_path)
    _edit_config(d, quant_method="hqq")
    with pytest.raises(ValueError, match="quant_method 'hqq' .* is not supported; supported"):
        _plan(d)


def test_missing_scale_tensor_is_named(tmp_path):
    d = _copy("gptq_w3g32", tmp_path)
    _edit_tensors(d, lambda sd: sd.pop("model.layers.1.mlp.down_proj.scales"))
    with pytest.raises(
        ValueError, match=r"missing tensors for: model\.layers\.1\.mlp\.down_proj\.scales"
    ):
        lowbit.Engine(model_path=str(d), dtype="float32", device="cpu")


def test_wrong_packed_shape_is_named(tmp_path):
    d = _copy("ct_w4a16_asym", tmp_path)
    key = "model.layers.0.mlp.down_proj.weight_packed"
    _edit_tensors(d, lambda sd: sd.__setitem__(key, sd[key][:, :-1].contiguous()))
    with pytest.raises(ValueError, match=rf"cannot load tensor '{key}'.*shape mismatch"):
        lowbit.Engine(model_path=str(d), dtype="float32", device="cpu")


def test_g_idx_out_of_range_is_named(tmp_path):
    d = _copy("gptq_w4g32_actorder", tmp_path)
    key = "model.layers.0.mlp.down_proj.g_idx"
    _edit_tensors(d, lambda sd: sd[key].__setitem__(0, 99))
    with pytest.raises(ValueError, match=r"down_proj\.g_idx has group indices in \[0, 99\]"):
        lowbit.Engine(model_path=str(d), dtype="float32", device="cpu")


def test_kv_cache_scales_collected(tmp_path):
    """ModelOpt `k_proj.k_scale` / compressed-tensors `self_attn.k_scale` → plan.kv_scales."""
    for name in ("modelopt_fp8_kv", "ct_mixed_kv"):
        d = _copy(name, tmp_path)
        sd = load_file(d / "model.safetensors")
        with lowbit.Engine(model_path=str(d), dtype="float32", device="cpu") as engine:
            scales = engine.quant_plan.kv_scales
        assert sorted(scales) == [0, 1]
        k = next(v for n, v in sd.items() if n.startswith("model.layers.1.") and "k_scale" in n)
        assert scales[1]["k"] == pytest.approx(float(k))


def test_inspect_prints_plan_without_weights(tmp_path):
    d = _copy("gptq_dynamic_mixed", tmp_path)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:200_000])
    text = format_plan(d)  # headers only: a truncated weight payload is never read
    assert "model.layers.0.self_attn.qkv_proj" in text and "per-shard" in text
    assert "int8 group64" in text and "wna16" in text


def test_tensor_index_reads_headers_only(tmp_path):
    d = _copy("ct_fp8_block", tmp_path)
    ix = TensorIndex.from_dir(d)
    info = ix.get("model.layers.0.mlp.down_proj", "weight")
    assert info.dtype == "F8_E4M3" and info.shape == (128, 256)
    assert torch.float8_e4m3fn  # fp8 dtypes exist in this torch
