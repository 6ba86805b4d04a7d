"""Every method on a tiny Llama: export → read back → logits equal to the in-memory model.

The in-memory fake-quantized model is rebuilt from the saved calibration state; the export is
read back with `readback` (formats.md's unpack rules, no code shared with the writers) and, once
lowbit's own loader reads the format, with `lowbit.Engine` too.
"""

from __future__ import annotations

import json

import pytest
import torch
from quant_settings import FAST
from safetensors import safe_open
from tiny import make_tiny_model

import lowbit
from lowbit.tools.quantize.calibrate import CalibState
from lowbit.tools.quantize.methods import METHODS
from lowbit.tools.quantize.simulate import fake_quant_model, from_export, from_state

IDS = [[5, 17, 99, 3, 250, 41, 7, 120, 64, 33, 200, 11, 90, 150, 2, 77]]
CASES = [(m, None) for m in METHODS] + [
    ("w4a16-rtn", "awq"), ("w4a16-rtn", "gptq"), ("w4a16-gptq", "gptq"), ("w4a16-awq", "awq"),
]  # fmt: skip

# (method, format) → {tensor suffix: (dtype, shape)} of model.layers.0.mlp.down_proj (N=128, K=256)
LAYOUT = {
    ("w4a16-rtn", None): {"weight_packed": (torch.int32, [128, 32]),
                          "weight_scale": (torch.float32, [128, 2]),
                          "weight_shape": (torch.int64, [2])},
    ("w4a16-awq", None): {"weight_zero_point": (torch.int32, [16, 2])},
    ("w4a16-rtn", "awq"): {"qweight": (torch.int32, [256, 16]), "qzeros": (torch.int32, [2, 16]),
                           "scales": (torch.float16, [2, 128])},
    ("w4a16-rtn", "gptq"): {"qweight": (torch.int32, [32, 128]), "qzeros": (torch.int32, [2, 16]),
                            "scales": (torch.float16, [2, 128]), "g_idx": (torch.int32, [256])},
    ("w8a16", None): {"weight_packed": (torch.int32, [128, 64]),
                      "weight_scale": (torch.float32, [128, 1])},
    ("w8a8-int8", None): {"weight": (torch.int8, [128, 256]),
                          "weight_scale": (torch.float32, [128, 1])},
    ("fp8-dynamic", None): {"weight": (torch.float8_e4m3fn, [128, 256]),
                            "weight_scale": (torch.float32, [128, 1])},
    ("fp8-static", None): {"weight_scale": (torch.float32, [1]),
                           "input_scale": (torch.float32, [1])},
    ("fp8-block", None): {"weight_scale": (torch.float32, [1, 2])},
    ("nvfp4", None): {"weight_packed": (torch.uint8, [128, 128]),
                      "weight_scale": (torch.float8_e4m3fn, [128, 16]),
                      "weight_global_scale": (torch.float32, [1]),
                      "input_global_scale": (torch.float32, [1])},
    ("modelopt_fp8", None): {"weight": (torch.float8_e4m3fn, [128, 256]),
                             "weight_scale": (torch.float32, []),
                             "input_scale": (torch.float32, [])},
    ("modelopt_fp4", None): {"weight": (torch.uint8, [128, 128]),
                             "weight_scale": (torch.float8_e4m3fn, [128, 16]),
                             "weight_scale_2": (torch.float32, []),
                             "input_scale": (torch.float32, [])},
}  # fmt: skip


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits[0].float()


@pytest.mark.parametrize("arch,method", [("qwen2", "w4a16-awq"), ("qwen3", "w4a16-gptq"),
                                         ("llama3-rope", "nvfp4")])  # fmt: skip
def test_other_architectures(tmp_path, arch, method):
    """qkv bias (Qwen2), q/k norms (Qwen3), tied embeddings (Llama 3) quantize and read back."""
    src, out, state = tmp_path / "src", tmp_path / "out", tmp_path / "state"
    make_tiny_model(src, arch)
    report = lowbit.quantize(str(src), str(out), method, checkpoint_save_path=str(state), **FAST)
    assert report["status"] == "passed"
    expected = _logits(from_state(src, CalibState.load(state, {}), METHODS[method]))
    torch.testing.assert_close(_logits(from_export(src, out)), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def wide_kv_src(tmp_path_factory):
    """A tiny Llama whose q/k/v each have 128 outputs, so 128×128 FP8 blocks fuse into qkv."""
    path = tmp_path_factory.mktemp("wide_kv")
    make_tiny_model(path, "llama", num_key_value_heads=4)
    return path


@pytest.mark.parametrize("method,fmt", CASES, ids=[f"{m}-{f or 'default'}" for m, f in CASES])
def test_method_exports_and_reads_back(request, tmp_path, method, fmt):
    # Block FP8 needs every fused shard's rows to be a multiple of 128 (formats.md §4.1).
    tiny_llama = request.getfixturevalue("wide_kv_src" if method == "fp8-block" else "tiny_llama")
    out, state_dir = tmp_path / "out", tmp_path / "state"
    act_order = (method, fmt) == ("w4a16-gptq", "gptq")  # g_idx through the GPTQ layout
    report = lowbit.quantize(str(tiny_llama), str(out), method, format=fmt, act_order=act_order,
                             checkpoint_save_path=str(state_dir), **FAST)  # fmt: skip
    m = METHODS[method]
    assert report["status"] == "passed" and report["method"] == method
    ev = report["eval"]
    assert 0 <= ev["kl_mean"] <= m.max_kl and ev["perplexity"] / ev["reference_perplexity"] < 2
    assert json.loads((out / "quantization_report.json").read_text())["status"] == "passed"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == {None: "compressed-tensors", "awq": "awq", "gptq": "gptq"}.get(
        fmt) if m.formats[0] != "modelopt" else qc["quant_method"] == "modelopt"  # fmt: skip
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".out.tmp-*"))

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
        for suffix, (dtype, shape) in LAYOUT.get((method, fmt), {}).items():
            t = f.get_tensor(f"model.layers.0.mlp.down_proj.{suffix}")
            assert (t.dtype, list(t.shape)) == (dtype, shape), suffix
        if act_order:
            g_idx = f.get_tensor("model.layers.0.mlp.down_proj.g_idx")
            assert not torch.equal(g_idx, torch.arange(256, dtype=torch.int32) // 128)
            assert qc["desc_act"] is True

    state = CalibState.load(state_dir, {})
    expected = _logits(from_state(tiny_llama, state, m))
    got = _logits(from_export(tiny_llama, out))
    # Tight: the export holds exactly the weights calibration produced.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    original = _logits(fake_quant_model(tiny_llama, {}, {}, {}))
    assert (got - original).abs().max() > 0  # it really is quantized

    try:
        engine = lowbit.Engine(model_path=str(out), dtype="float32", device="cpu")
    except (ValueError, ImportError, NotImplementedError) as e:  # parser not landed yet
        pytest.skip(f"lowbit cannot load {method}/{fmt or 'ct'} exports yet: {e}")
    try:
        tol = 1e-3 if m.act is None else 5e-2  # runtime activation quant may round differently
        torch.testing.assert_close(engine.logits(IDS)[0], expected, rtol=tol, atol=tol)
    finally:
        engine.shutdown()
