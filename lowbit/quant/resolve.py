"""Resolve a checkpoint's quantization (config files + flags) into a QuantPlan before loading.

Detection order: config.json `quantization_config` → `quantize_config.json` / `quant_config.json`
(AutoGPTQ, AutoAWQ) → `hf_quant_config.json` (ModelOpt) → `quantization_config.json`
(auto-round). A `--quantization` flag must name the checkpoint's method or a compatible one
(each parser lists them); on a full-precision checkpoint it names an online method.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from lowbit.config import ModelConfig
from lowbit.kernels.codes import e8m0_decode
from lowbit.quant.formats.base import FormatResult, TensorIndex
from lowbit.quant.online import METHODS, online_plan
from lowbit.quant.spec import QuantPlan

# quant_method → "module:function(qcfg, index) -> FormatResult"
PARSERS = {
    "awq": "gptq:parse_awq",
    "gptq": "gptq:parse_gptq",
    "compressed-tensors": "compressed_tensors:parse",
    "fp8": "fp8:parse",
    "modelopt": "modelopt:parse",
    "modelopt_fp4": "modelopt:parse",
    "auto-round": "auto_round:parse",
    "intel/auto-round": "auto_round:parse",
    "bitsandbytes": "bitsandbytes:parse",
}
SIDE_FILES = (
    "quantize_config.json",
    "quant_config.json",
    "hf_quant_config.json",
    "quantization_config.json",
)
# `--quantization gptq|awq` on a full-precision checkpoint: calibrated first (tools.quantize.online)
CALIBRATED = ("gptq", "awq")
# Tensors some producers write that no lowbit parameter holds.
UNUSED_SUFFIXES = (".q_scale", ".prob_output_scale", "q_proj.output_scale", ".weight_format")


def detect(model_dir: Path, model_config: ModelConfig) -> tuple[dict, str] | None:
    """The quantization config dict and the file it came from, or None (full precision)."""
    if model_config.quantization_config is not None:
        return dict(model_config.quantization_config), "config.json"
    for name in SIDE_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            return json.loads(path.read_text()), name
    return None


def _method(qcfg: dict, source: str) -> str:
    """quant_method, inferred for side files that predate it."""
    if "quant_method" in qcfg:
        return str(qcfg["quant_method"]).lower()
    if source == "hf_quant_config.json" or qcfg.get("producer", {}).get("name") == "modelopt":
        return "modelopt"
    if "w_bit" in qcfg or "zero_point" in qcfg:
        return "awq"
    if "bits" in qcfg:
        return "gptq"
    raise ValueError(f"{source} has no quant_method and is not a known legacy layout")


def parse_format(model_dir: Path, model_config: ModelConfig) -> FormatResult | None:
    """Run the right format parser on the checkpoint's config and tensor headers."""
    found = detect(model_dir, model_config)
    if found is None:
        return None
    qcfg, source = found
    method = _method(qcfg, source)
    if method not in PARSERS:
        raise ValueError(
            f"{model_dir}: quant_method {method!r} (from {source}) is not supported; "
            f"supported: {sorted(PARSERS)}"
        )
    module, fn = PARSERS[method].split(":")
    parser = getattr(importlib.import_module(f"lowbit.quant.formats.{module}"), fn)
    return parser(qcfg, TensorIndex.from_dir(model_dir))


def resolve_plan(
    model_dir: str | Path,
    model_config: ModelConfig,
    quantization: str | None = None,
    torchao_config: str | None = None,
    quantize_lm_head: bool = False,
) -> QuantPlan:
    """The plan for this checkpoint and flags; errors name the checkpoint's format and the fix."""
    model_dir = Path(model_dir)
    if torchao_config is not None:
        raise ValueError("--torchao-config is resolved by lowbit.quant.torchao, not resolve_plan")
    result = parse_format(model_dir, model_config)
    if result is None:
        return _full_precision(model_dir, model_config, quantization, quantize_lm_head)
    if quantize_lm_head:
        raise ValueError(
            f"--quantize-lm-head quantizes a full-precision lm_head online, but {model_dir} is "
            f"already quantized ({result.kind}); drop the flag"
        )
    if quantization is not None and quantization.lower() not in result.accepts:
        raise ValueError(
            f"--quantization {quantization} does not fit {model_dir}: it is a "
            f"{result.kind} checkpoint (quant_method {result.method!r}); use "
            f"--quantization {result.accepts[0]} or leave the flag out"
        )
    return plan_from(result)


def _full_precision(
    model_dir: Path, cfg: ModelConfig, quantization: str | None, lm_head: bool = False
) -> QuantPlan:
    """Unquantized, or an online method's plan."""
    if quantization is None:
        return QuantPlan()
    name = quantization.lower()
    if name in METHODS:
        if lm_head and cfg.tie_word_embeddings:
            raise ValueError(
                f"--quantize-lm-head: {model_dir} ties lm_head to the input embedding, which "
                "stays full precision; drop the flag"
            )
        return online_plan(name, lm_head)
    if name in CALIBRATED:
        raise ValueError(
            f"--quantization {name} on the full-precision {model_dir} needs calibration: "
            f"lowbit.tools.quantize.online.calibrated_checkpoint(model_dir, {name!r}) (the Engine "
            "and the server call it for you)"
        )
    if name in PARSERS:
        raise ValueError(
            f"--quantization {quantization} needs a {quantization} checkpoint, but "
            f"{model_dir} is full precision (no quantization config); leave the "
            "flag out"
        )
    raise ValueError(
        f"unknown --quantization {quantization!r}; pre-quantized methods: "
        f"{sorted(PARSERS)}; online: {sorted(METHODS)} (+ {list(CALIBRATED)} with calibration); "
        "or --torchao-config"
    )


def plan_from(result: FormatResult) -> QuantPlan:
    """A QuantPlan over a parsed format: spec lookup, tensor renames, KV-scale names."""
    specs = result.specs
    return QuantPlan(
        method=result.method,
        description=result.kind,
        spec_of=lambda name: specs.get(name),
        rename=_renamer(result),
        unused=lambda name: name.endswith(UNUSED_SUFFIXES + result.unused_suffixes),
    )


def _renamer(result: FormatResult) -> Callable[[str, Tensor], list[tuple[str, Tensor]]]:
    """Checkpoint (name, tensor) → canonical pairs: KV-scale names, param renames, e8m0."""
    kv = {
        "k_proj.output_scale": "k_scale",
        "v_proj.output_scale": "v_scale",
        "k_proj.k_scale": "k_scale",
        "v_proj.v_scale": "v_scale",
        **result.kv_names,
    }

    def rename(name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        if tensor.dtype == getattr(torch, "float8_e8m0fnu", None):
            tensor = e8m0_decode(tensor.view(torch.uint8))
        if name.endswith(".self_attn.kv_scale"):  # legacy: one scale for K and V
            base = name.rsplit(".", 1)[0]
            return [(f"{base}.k_scale", tensor), (f"{base}.v_scale", tensor)]
        for suffix, canon in kv.items():
            if name.endswith("." + suffix):
                return [(name[: -len(suffix)] + canon, tensor)]
        module, _, param = name.rpartition(".")
        if param in result.renames:
            name = f"{module}.{result.renames[param]}"
        if result.convert is not None:
            return result.convert(name, tensor)
        return [(name, tensor)]

    return rename
