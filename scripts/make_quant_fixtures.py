"""Quantize a tiny Llama with the real third-party tools; commit the results as test fixtures.

Run in a separate venv holding the tools (see tests/fixtures/quant/README.md):
    /work/qvenv/bin/python -m scripts.make_quant_fixtures [NAME ...]
Each fixture directory gets config.json, model.safetensors, reference.safetensors (the tool's
own float32 logits on fixed token ids) and fixture.json (tool, version, recipe).
"""

from __future__ import annotations

import argparse
import importlib
import traceback
from pathlib import Path

import torch

from scripts.fixtures.common import base_model, eval_ids, logits_of

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "quant"
TOOLS = ("llmc", "gptqmodel_fx", "autoround_fx", "modelopt_fx", "bnb_fx")


def makers() -> dict:
    """Fixture name → (module, maker) for every tool whose module imports here."""
    out = {}
    for tool in TOOLS:
        try:
            mod = importlib.import_module(f"scripts.fixtures.{tool}")
        except ImportError as e:  # a venv holding only some of the tools
            print(f"skip {tool}: {e}", flush=True)
            continue
        for name in mod.NAMES:
            out[name] = mod
    return out


def main() -> None:
    """Make the named fixtures (all by default) and the base model's logits."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*")
    args = ap.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"logits": logits_of(base_model().float()), "ids": eval_ids()}, ROOT / "base_logits.pt"
    )
    todo = makers()
    for name in args.names or list(todo):
        try:
            todo[name].make(name, ROOT)
            print(f"ok   {name}", flush=True)
        except Exception:
            traceback.print_exc()
            print(f"FAIL {name}", flush=True)


if __name__ == "__main__":
    main()
