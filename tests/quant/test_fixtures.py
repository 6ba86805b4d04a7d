"""Checkpoints made by the real tools (scripts/make_quant_fixtures.py) load with no flag and
match each tool's own reference logits.

Bound per fixture: relative error ≤ max(0.3 × (reference vs unquantized base), 0.01) and top-1
agreement ≥ 0.95. `fixture.json` in each directory names the tool, version, recipe and how the
reference was computed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_tokenizer

import lowbit

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "quant"
FIXTURES = sorted(p.name for p in ROOT.iterdir() if (p / "reference.pt").is_file())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _measure(model_dir: Path, base_logits: torch.Tensor) -> tuple[float, float, float]:
    """(relative error, bound, top-1 agreement) of lowbit on a fixture copied to `model_dir`."""
    make_tokenizer(model_dir, 384)  # the engine needs one; fixtures keep only the weights
    ref = torch.load(model_dir / "reference.pt")
    meta = json.loads((model_dir / "fixture.json").read_text())
    kv = "fp8_e4m3" if meta.get("kv_cache_fp8") else "auto"
    with lowbit.Engine(
        model_path=str(model_dir), dtype="float32", device="cpu", kv_cache_dtype=kv
    ) as engine:
        assert engine.quant_plan.method is not None, "detected with no flag"
        out = engine.logits(ref["ids"].tolist())
    err, quant_err = _rel(out, ref["logits"]), _rel(base_logits, ref["logits"])
    top1 = float((out.argmax(-1) == ref["logits"].argmax(-1)).float().mean())
    return err, max(0.3 * quant_err, 0.01), top1


@pytest.fixture(scope="module")
def base_logits() -> torch.Tensor:
    return torch.load(ROOT / "base_logits.pt")["logits"]


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_matches_tool_reference(name, tmp_path, base_logits):
    model_dir = tmp_path / name
    shutil.copytree(ROOT / name, model_dir)
    err, bound, top1 = _measure(model_dir, base_logits)
    tool = json.loads((model_dir / "fixture.json").read_text())["tool"]
    assert err <= bound, f"{name} ({tool}): error {err:.4f} > {bound:.4f}"
    assert top1 >= 0.95, f"{name} ({tool}): top-1 agreement {top1:.3f}"


# Measured on modelopt_fp8_kv (bound 0.0197): the checkpoint's scales 0.00000; k_scale ×0.5
# (the top half of |k| saturates) 0.042; v_scale 1.0 (a runtime ignoring the scales) 0.056.
# Power-of-two multiples that saturate nothing (k_scale ×2, ×4) dequantize to the same values.
@pytest.mark.parametrize(
    ("tensor", "wrong"),
    [("k_proj.k_scale", lambda s: s * 0.5), ("v_proj.v_scale", torch.ones_like)],
    ids=["k_scale_x0.5", "v_scale_1.0"],
)
def test_wrong_kv_scale_fails_the_bound(tensor, wrong, tmp_path, base_logits):
    """The fp8-KV fixture's bound catches K/V scales other than the checkpoint's."""
    model_dir = tmp_path / "modelopt_fp8_kv"
    shutil.copytree(ROOT / "modelopt_fp8_kv", model_dir)
    sd = load_file(model_dir / "model.safetensors")
    names = [n for n in sd if n.endswith(tensor)]
    assert names, f"no {tensor} in the fixture"
    sd.update({n: wrong(sd[n]) for n in names})
    save_file(sd, model_dir / "model.safetensors", metadata={"format": "pt"})
    err, bound, _ = _measure(model_dir, base_logits)
    assert err > bound, f"{tensor} changed, yet error {err:.4f} ≤ bound {bound:.4f}"
