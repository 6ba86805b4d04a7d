"""Architecture name (config.json "architectures") → model class, imported lazily."""

from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": "lowbit.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "lowbit.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "lowbit.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "lowbit.models.llama:LlamaForCausalLM",
}


def model_class(architecture: str) -> type:
    """The class for an architecture name; a failed lookup lists the supported ones."""
    if architecture not in _MODELS:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {sorted(_MODELS)}"
        )
    module, cls = _MODELS[architecture].split(":")
    return getattr(importlib.import_module(module), cls)


def supported_architectures() -> list[str]:
    """Names lowbit can load."""
    return sorted(_MODELS)
