"""Bad input to the loader and the Engine: each a clear error, asserted by message."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit


def _copy(src, dst):
    """A writable copy of a model directory."""
    shutil.copytree(src, dst)
    return dst


def _edit_weights(path, fn):
    """Rewrite model.safetensors through fn(dict) -> dict."""
    f = path / "model.safetensors"
    save_file(fn(load_file(f)), f)


def test_nonexistent_path():
    """A path that does not exist says so."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lowbit.Engine("/no/such/model", device="cpu")


def test_hub_id_offline_names_id_and_fix(monkeypatch):
    """A hub id without network names the id and how to use a local copy."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model.*--model-path"):
        lowbit.Engine("no-such-org/no-such-model", device="cpu")


def test_truncated_safetensors(tiny_llama, tmp_path):
    """A truncated weights file is reported with its name."""
    path = _copy(tiny_llama, tmp_path / "m")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        lowbit.Engine(str(path), device="cpu")


def test_missing_tensor(tiny_llama, tmp_path):
    """A missing tensor is named."""
    path = _copy(tiny_llama, tmp_path / "m")
    _edit_weights(path, lambda w: {k: v for k, v in w.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(ValueError, match=r"missing tensors for: .*layers\.1\.mlp\.gate_up_proj"):
        lowbit.Engine(str(path), device="cpu")


def test_unexpected_tensor(tiny_llama, tmp_path):
    """A tensor the model has no place for is named with its file."""
    path = _copy(tiny_llama, tmp_path / "m")
    _edit_weights(path, lambda w: {**w, "model.layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.extra.weight' in"):
        lowbit.Engine(str(path), device="cpu")


def test_misshaped_tensor(tiny_llama, tmp_path):
    """A tensor of the wrong shape is named with both shapes."""
    path = _copy(tiny_llama, tmp_path / "m")
    key = "model.layers.0.self_attn.k_proj.weight"
    _edit_weights(path, lambda w: {**w, key: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=rf"{key}.*expected \(64, 128\).*\(3, 3\)"):
        lowbit.Engine(str(path), device="cpu")


def test_pickle_only_checkpoint_refused(tiny_llama, tmp_path):
    """A checkpoint with only .bin files is refused: lowbit never unpickles."""
    path = _copy(tiny_llama, tmp_path / "m")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        lowbit.Engine(str(path), device="cpu")


def test_unknown_architecture(tiny_llama, tmp_path):
    """An architecture lowbit does not have lists the supported ones."""
    path = _copy(tiny_llama, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTBigCodeForCausalLM.*supported.*LlamaForCausalLM"):
        lowbit.Engine(str(path), device="cpu")


@pytest.fixture(scope="module")
def engine(tiny_llama):
    """A small-context engine for request-level checks."""
    with lowbit.Engine(str(tiny_llama), device="cpu", context_length=64) as eng:
        yield eng


@pytest.mark.parametrize(
    "prompt,params,exc,match",
    [
        ("", {}, ValueError, "prompt is empty"),
        ([], {}, ValueError, "no prompts given"),
        ("hi", {"max_new_tokens": -1}, ValueError, "max_new_tokens=-1 is invalid"),
        ("hi", {"temperature": -0.5}, ValueError, "temperature=-0.5 is invalid"),
        ("hi", {"top_p": 0}, ValueError, "top_p=0 is invalid"),
        ("hi", {"n": 0}, ValueError, "n=0 is invalid"),
        ("hi", {"logprobs": 50}, ValueError, "logprobs=50 is invalid"),
        ("hi", {"max_new_token": 5}, ValueError, "unknown sampling parameters"),
        ([1] * 64, {}, ValueError, "prompt has 64 tokens but the context length is 64"),
        ([1, 99999], {}, ValueError, r"outside the vocabulary \[0, 384\)"),
        ([1.5, 2], {}, TypeError, "a prompt is a str or a list of token ids"),
    ],
)  # fmt: skip
def test_bad_requests(engine, prompt, params, exc, match):
    """Each bad request fails clearly and leaves the engine usable."""
    with pytest.raises(exc, match=match):
        engine.generate(prompt, params)
    assert engine.generate("ok", {"max_new_tokens": 2, "temperature": 0})[0].outputs[0].token_ids


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dtype": "int7"}, "dtype='int7' is not supported"),
        ({"kv_cache_dtype": "fp4"}, "kv_cache_dtype='fp4' is not supported"),
        ({"load_format": "pt"}, "load_format='pt' is not supported"),
        ({"context_length": 100000}, "exceeds the model's max_position_embeddings"),
        ({"tp_size": 2}, "tensor parallelism is not available yet"),
        ({"quantization": "fp8", "torchao_config": "int8wo"}, "both given"),
        ({"device": "tpu"}, "device='tpu' is not supported"),
    ],
)
def test_bad_engine_args(tiny_llama, kwargs, match):
    """Bad engine options fail before loading, naming the option."""
    with pytest.raises(ValueError, match=match):
        lowbit.Engine(str(tiny_llama), **kwargs)


def test_max_new_tokens_past_context_stops_at_context(engine):
    """Generation never runs past the context: it ends with 'length' at the limit."""
    out = engine.generate([1] * 60, {"max_new_tokens": 50, "ignore_eos": True, "temperature": 0})
    assert len(out[0].outputs[0].token_ids) == 4 and out[0].outputs[0].finish_reason == "length"
