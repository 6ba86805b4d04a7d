"""NVIDIA ModelOpt layout (formats.md §5): FP8 per-tensor and NVFP4, with hf_quant_config.json."""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels.codes import pack_fp4
from lowbit.tools.quantize.methods import Method

PRODUCER = {"name": "modelopt", "version": "0.29.0"}


def _algo(method: Method) -> str:
    """ModelOpt's quant_algo name."""
    return "NVFP4" if method.weight == "nvfp4" else "FP8"


def quantization_config(method: Method, opts, ignored: list[str]) -> dict:
    """config.json["quantization_config"] in ModelOpt's newer embedded form (§5.2)."""
    if method.weight == "nvfp4":
        args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    else:
        args = {"dynamic": False, "num_bits": 8, "type": "float"}
    return {
        "quant_method": "modelopt", "quant_algo": _algo(method),
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": dict(args),
                                      "input_activations": dict(args)}},
        "ignore": ignored, "kv_cache_scheme": None, "producer": PRODUCER,
    }  # fmt: skip


def extra_files(method: Method, opts, ignored: list[str]) -> dict:
    """hf_quant_config.json (the legacy file SGLang and vLLM detect ModelOpt by)."""
    q = {"quant_algo": _algo(method), "kv_cache_quant_algo": None, "exclude_modules": ignored}
    if method.weight == "nvfp4":
        q["group_size"] = 16
    return {"hf_quant_config.json": {"producer": PRODUCER, "quantization": q}}


def linear_tensors(r: dict, method: Method, opts, dtype: torch.dtype) -> dict[str, Tensor]:
    """FP8: weight F8, 0-dim F32 weight_scale / input_scale. NVFP4: U8 weight, F8 block scales,
    weight_scale_2 and input_scale as multipliers (reciprocals of compressed-tensors' divisors)."""
    if method.weight == "fp8":
        return {"weight": r["codes"], "weight_scale": r["scale"].float().reshape(()),
                "input_scale": r["input_scale"].float().reshape(())}  # fmt: skip
    return {
        "weight": pack_fp4(r["codes"]),
        "weight_scale": r["block_scale"],
        "weight_scale_2": (1.0 / r["global_scale"].float()).reshape(()),
        "input_scale": (1.0 / r["input_global_scale"].float()).reshape(()),
    }
