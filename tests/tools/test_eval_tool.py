"""`lowbit eval`: self-comparison is exact, a perturbed copy is not, the CLI prints JSON."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.cli import main
from lowbit.tools.eval import EvalResult, run_eval
from lowbit.tools.textdata import (
    CALIB_MODULES,
    HELDOUT_MODULES,
    builtin_calibration_text,
    builtin_heldout_text,
)


@pytest.fixture(scope="module")
def perturbed(tiny_llama, tmp_path_factory):
    """A copy of the tiny Llama with layer 1's down_proj perturbed."""
    path = tmp_path_factory.mktemp("perturbed")
    for f in tiny_llama.iterdir():
        shutil.copy2(f, path / f.name)
    tensors = load_file(str(path / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    torch.manual_seed(1)
    tensors[name] = tensors[name] + 0.05 * torch.randn_like(tensors[name])
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_builtin_texts_are_disjoint_and_nonempty():
    assert not set(CALIB_MODULES) & set(HELDOUT_MODULES)
    calib, held = builtin_calibration_text(), builtin_heldout_text()
    assert len(calib) > 10_000 and len(held) > 10_000
    assert held[:2000] not in calib


def test_self_comparison_is_exact(tiny_llama):
    res = run_eval(str(tiny_llama), str(tiny_llama), max_tokens=200, seq_len=64)
    assert res.num_tokens == 3 * 63
    assert res.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert res.top1_agreement == 1.0
    assert res.perplexity == pytest.approx(res.reference_perplexity, rel=1e-6)
    assert len(res.layer_rel_error) == 2
    assert max(res.layer_rel_error) < 1e-6


def test_perturbed_copy_differs_from_layer_one(tiny_llama, perturbed):
    res = run_eval(str(perturbed), str(tiny_llama), max_tokens=200, seq_len=64)
    assert res.kl_mean > 1e-4 and res.kl_p99 >= res.kl_mean
    assert res.top1_agreement < 1.0
    assert res.layer_rel_error[0] < 1e-6 < res.layer_rel_error[1]


def test_cli_json_and_table(tiny_llama, perturbed, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": "def f(x):\n    return x * 2\n" * 20})
                              for _ in range(3)))  # fmt: skip
    argv = ["eval", "--model", str(perturbed), "--reference", str(tiny_llama),
            "--data", str(data), "--max-tokens", "128", "--seq-len", "32"]  # fmt: skip
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"perplexity", "kl_mean", "kl_p99", "top1_agreement", "layer_rel_error"}
    assert main(argv) == 0
    assert "KL mean" in capsys.readouterr().out


def test_eval_without_reference_reports_perplexity_only(tiny_llama):
    res = run_eval(str(tiny_llama), max_tokens=100, seq_len=50)
    assert isinstance(res, EvalResult) and res.kl_mean is None and res.perplexity > 1


def test_eval_bad_data(tiny_llama, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["eval", "--model", str(tiny_llama), "--data", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_llama), "--data", str(tmp_path / "no.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_models_are_scored_one_at_a_time(tiny_llama, monkeypatch):
    """Each scoring engine holds one window's KV cache, and the first is shut down — its model
    layers freed, not held by a scorer — before the second loads (two serving-sized engines cannot
    share one GPU)."""
    import weakref

    import lowbit.tools.eval as ev

    live, peak, made, models = [], [], [], []
    real = ev.scoring_engine

    def tracked(*a, **kw):
        assert all(m() is None for m in models), "an earlier model is still alive"
        engine = real(*a, **kw)
        models.append(weakref.ref(ev._decoder_layers(engine.runner.model)[0]))
        made.append(engine)
        live.append(engine)
        peak.append(len(live))
        shutdown = engine.shutdown
        engine.shutdown = lambda: (live.remove(engine), shutdown())
        return engine

    monkeypatch.setattr(ev, "scoring_engine", tracked)
    res = run_eval(str(tiny_llama), str(tiny_llama), max_tokens=200, seq_len=64)
    assert res.kl_mean == pytest.approx(0.0, abs=1e-9)
    assert len(made) == 2 and max(peak) == 1 and not live
    for engine in made:
        assert engine.allocator.num_blocks * engine.args.block_size <= 64 + 2 * 16
