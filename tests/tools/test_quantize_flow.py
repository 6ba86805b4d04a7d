"""`lowbit quantize` end to end: bad input fails before any work, restore reproduces the export,
an interrupted run leaves nothing that looks valid, a failed gate exits non-zero."""

from __future__ import annotations

import json

import pytest
import torch
from quant_settings import FAST

import lowbit
from lowbit.cli import main
from lowbit.tools.quantize import api
from lowbit.tools.quantize.api import QualityGateError


def _no_export(tmp_path, out):
    """Nothing at `out` and no temporary export left next to it."""
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"method": "int3-magic"}, ValueError, "unknown --method"),
        ({"format": "gguf"}, ValueError, "unknown --format"),
        ({"method": "fp8-dynamic", "format": "awq"}, ValueError, "does not fit"),
        ({"group_size": 96}, ValueError, "does not divide"),
        ({"method": "w4a16-gptq", "format": "awq", "act_order": True}, ValueError, "AWQ"),
        ({"method": "fp8-dynamic", "act_order": True}, ValueError, "gptq only"),
        ({"calib_data": "MISSING"}, FileNotFoundError, "does not exist"),
        ({"calib_data": "EMPTY"}, ValueError, "empty"),
        ({"calib_data": "SHORT"}, ValueError, "too short"),
        ({"num_samples": 100000}, ValueError, "too short"),
    ],
)
def test_bad_input_fails_before_any_work(tiny_llama, tmp_path, monkeypatch, kwargs, error, match):
    files = {"MISSING": tmp_path / "missing.txt", "EMPTY": tmp_path / "empty.txt",
             "SHORT": tmp_path / "short.jsonl"}  # fmt: skip
    files["EMPTY"].write_text("\n \n")
    files["SHORT"].write_text('{"text": "def f(): pass"}\n')
    if "calib_data" in kwargs:
        kwargs["calib_data"] = str(files[kwargs["calib_data"]])
    monkeypatch.setattr(api, "calibrate", lambda *a, **k: pytest.fail("calibration started"))
    args = {"method": "w4a16-gptq", **FAST, **kwargs}
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        lowbit.quantize(str(tiny_llama), str(out), **args)
    _no_export(tmp_path, out)


def test_existing_export_dir_needs_overwrite(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ["quantize", "--model-path", str(tiny_llama), "--export-dir", str(out),
            "--method", "w4a16-rtn"]  # fmt: skip
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(argv + ["--overwrite", "--eval-max-tokens", "128"]) == 0
    assert not (out / "keep.txt").exists() and (out / "quantization_report.json").is_file()


def test_interrupted_run_leaves_no_valid_looking_export(tiny_llama, tmp_path, monkeypatch):
    real = api.write_export

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)  # everything written into the temporary dir...
        raise KeyboardInterrupt  # ...then the user presses Ctrl-C before the gate

    monkeypatch.setattr(api, "write_export", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        lowbit.quantize(str(tiny_llama), str(out), "w4a16-rtn", **FAST)
    _no_export(tmp_path, out)
    # A run killed outright leaves its hidden temp dir; the next run clears it.
    killed = tmp_path / ".out.tmp-999999999"
    (killed / "sub").mkdir(parents=True)
    monkeypatch.setattr(api, "write_export", real)
    lowbit.quantize(str(tiny_llama), str(out), "w4a16-rtn", **FAST)
    assert not killed.exists() and (out / "quantization_report.json").is_file()


def test_restored_calibration_gives_identical_export(tiny_llama, tmp_path):
    state = tmp_path / "state"
    a, b = tmp_path / "a", tmp_path / "b"
    lowbit.quantize(str(tiny_llama), str(a), "w4a16-gptq", checkpoint_save_path=str(state), **FAST)
    rep = lowbit.quantize(str(tiny_llama), str(b), "w4a16-gptq",
                          checkpoint_restore_path=str(state), **FAST)  # fmt: skip
    assert rep["restored_from"] == str(state)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    with pytest.raises(ValueError, match="other settings"):
        lowbit.quantize(str(tiny_llama), str(tmp_path / "c"), "w4a16-gptq", group_size=64,
                        checkpoint_restore_path=str(state), **FAST)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no calibration state"):
        lowbit.quantize(str(tiny_llama), str(tmp_path / "d"), "w4a16-gptq",
                        checkpoint_restore_path=str(tmp_path), **FAST)  # fmt: skip


def test_failed_gate_marks_export_and_exits_nonzero(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(QualityGateError, match="mean KL"):
        lowbit.quantize(str(tiny_llama), str(out), "w4a16-rtn", max_kl=1e-9, **FAST)
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["status"] == "failed" and report["reasons"]
    assert (out / "QUANTIZATION_FAILED").is_file()
    argv = ["quantize", "--model-path", str(tiny_llama), "--export-dir", str(out), "--overwrite",
            "--method", "fp8-dynamic", "--max-kl", "1e-9", "--eval-max-tokens", "128"]  # fmt: skip
    assert main(argv) == 3
    assert "quality gate" in capsys.readouterr().err


def test_ignore_patterns_keep_modules_unquantized(tiny_llama, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "out"
    ignore = ["model.layers.0.mlp.down_proj", "re:.*layers[.]1[.]self_attn[.][qk]_proj$"]
    report = lowbit.quantize(str(tiny_llama), str(out), "fp8-dynamic", ignore=ignore, **FAST)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    expected = ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                "model.layers.1.self_attn.k_proj"]  # fmt: skip
    assert qc["ignore"] == report["ignored"] == expected
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.down_proj.weight_scale" not in f.keys()
        assert f.get_tensor("model.layers.1.self_attn.q_proj.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.1.self_attn.v_proj.weight").dtype == torch.float8_e4m3fn
        assert "model.layers.1.self_attn.v_proj.weight_scale" in f.keys()


def test_online_calibrated_checkpoint_is_cached(tiny_llama, tmp_path, monkeypatch):
    from lowbit.tools.quantize import online

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    out = online.calibrated_checkpoint(tiny_llama, "gptq", num_samples=4, seq_len=32,
                                       progress=False, eval_max_tokens=256)  # fmt: skip
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and out.parent == tmp_path / "calibrated"
    monkeypatch.setattr(api, "calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    assert online.calibrated_checkpoint(tiny_llama, "gptq", num_samples=4, seq_len=32) == out
    with pytest.raises(ValueError, match="online calibration supports"):
        online.calibrated_checkpoint(tiny_llama, "fp8")


def test_source_must_be_full_precision(tiny_llama, tmp_path):
    first = tmp_path / "first"
    lowbit.quantize(str(tiny_llama), str(first), "w4a16-rtn", **FAST)
    with pytest.raises(ValueError, match="already quantized"):
        lowbit.quantize(str(first), str(tmp_path / "second"), "w4a16-rtn", **FAST)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lowbit.quantize(str(tmp_path / "nowhere"), str(tmp_path / "third"), "w4a16-rtn", **FAST)
