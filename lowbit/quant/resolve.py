"""Resolve a checkpoint's quantization (config files + flags) into a QuantPlan before loading."""

from __future__ import annotations

from pathlib import Path

from lowbit.config import ModelConfig
from lowbit.quant.spec import QuantPlan


def resolve_plan(
    model_dir: str | Path,
    model_config: ModelConfig,
    quantization: str | None = None,
    torchao_config: str | None = None,
) -> QuantPlan:
    """The plan for this checkpoint and flags; errors name the checkpoint's format and the fix."""
    if model_config.quantization_config is not None:
        method = model_config.quantization_config.get("quant_method", "?")
        raise ValueError(f"pre-quantized checkpoints ({method!r}) are not supported yet")
    if quantization is not None or torchao_config is not None:
        raise ValueError("online quantization is not supported yet")
    return QuantPlan()
