"""`lowbit inspect MODEL`: the plan, module → spec → scheme → kernel, reading no weights."""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.config import ModelConfig
from lowbit.quant.resolve import resolve_plan


def format_plan(model_path: str | Path | None, quantization: str | None = None) -> str:
    """The plan as text: one line per linear layer, with its checkpoint specs and scheme.

    `model_path` as the Engine takes it: a directory, a hub id, or None (the demo model)."""
    from lowbit.loader.loader import build_model  # the model decides which layers are fused
    from lowbit.loader.weights import resolve_model_path

    model_dir = resolve_model_path(model_path)
    cfg = ModelConfig.from_dir(model_dir)
    plan = resolve_plan(model_dir, cfg, quantization)
    build_model(cfg, plan, torch.bfloat16, "meta")  # schemes are chosen as layers are built
    lines = [f"{model_dir}: {plan.description} (quant_method {plan.method})"]
    for prefix, scheme in plan.chosen.items():
        lines.append(f"  {prefix}")
        lines.append(f"    spec:   {_specs(plan, prefix)}")
        lines.append(f"    scheme: {scheme.describe()}")
    return "\n".join(lines)


def _specs(plan, prefix: str) -> str:
    """The checkpoint modules' specs behind a lowbit layer (shards joined by " | ")."""
    sources = plan.sources.get(prefix, [prefix])
    specs = [plan.spec_of(s) for s in sources]
    if all(s == specs[0] for s in specs):
        return str(specs[0] or "unquantized")
    return " | ".join(
        f"{s.rsplit('.', 1)[-1]}: {sp or 'unquantized'}" for s, sp in zip(sources, specs)
    )
