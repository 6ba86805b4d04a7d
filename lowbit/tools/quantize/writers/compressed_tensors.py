"""compressed-tensors layout (formats.md §3), as llm-compressor writes it and vLLM loads it."""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels.codes import pack_fp4, pack_int32
from lowbit.tools.quantize.methods import Method

CT_VERSION = "0.19.0"


def _args(num_bits, typ, strategy, *, symmetric=True, group_size=None, block=None,
          dynamic=False, actorder=None, observer="minmax") -> dict:  # fmt: skip
    """A QuantizationArgs dict with every field compressed-tensors (0.19) serializes.

    FP4 needs `scale_dtype` float8_e4m3fn, or compressed-tensors leaves dynamic activation block
    scales unrounded; `zp_dtype` is serialized only for asymmetric args (int8 zero points).
    """
    fp4 = typ == "float" and num_bits == 4
    return {
        "num_bits": num_bits, "type": typ, "symmetric": symmetric, "group_size": group_size,
        "strategy": strategy, "block_structure": block, "dynamic": dynamic,
        "actorder": actorder, "scale_dtype": "torch.float8_e4m3fn" if fp4 else None,
        "zp_dtype": None if symmetric else "torch.int8", "observer": observer,
        "observer_kwargs": {},
    }  # fmt: skip


def scheme_args(method: Method, opts) -> tuple[dict, dict | None, str]:
    """(weights args, input_activations args or None, format) of a method."""
    if method.weight == "int":
        per_channel = opts.group_size in (-1, 0)
        w = _args(method.bits, "int", "channel" if per_channel else "group",
                  symmetric=method.sym, group_size=None if per_channel else opts.group_size,
                  actorder=opts.act_order)  # fmt: skip
        if method.act == "int8-token":
            return w, _args(8, "int", "token", dynamic=True, observer=None), "int-quantized"
        return w, None, "pack-quantized"
    if method.weight == "fp8":
        if method.fp8_strategy == "block":
            w = _args(8, "float", "block", block=[128, 128])
            a = _args(8, "float", "group", group_size=128, dynamic=True, observer=None)
        elif method.fp8_strategy == "channel":
            w = _args(8, "float", "channel")
            a = _args(8, "float", "token", dynamic=True, observer=None)
        else:
            w = _args(8, "float", "tensor")
            a = _args(8, "float", "tensor")
        return w, a, "float-quantized"
    w = _args(4, "float", "tensor_group", group_size=16)
    a = None
    if method.act == "nvfp4":
        a = _args(4, "float", "tensor_group", group_size=16, dynamic="local")
    return w, a, "nvfp4-pack-quantized"


def quantization_config(method: Method, opts, ignored: list[str]) -> dict:
    """config.json["quantization_config"] as compressed-tensors writes it."""
    w, a, fmt = scheme_args(method, opts)
    return {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": w,
                                      "input_activations": a, "output_activations": None,
                                      "format": fmt}},
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": ignored,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }  # fmt: skip


def extra_files(method: Method, opts, ignored: list[str]) -> dict:
    """No side files."""
    return {}


def linear_tensors(r: dict, method: Method, opts, dtype: torch.dtype) -> dict[str, Tensor]:
    """Tensors of one quantized linear (suffixes after the module name)."""
    out: dict[str, Tensor] = {}
    if method.weight == "int":
        codes = r["codes"]  # (N, K) unsigned = signed code + 2^(b-1)
        N, K = codes.shape
        out["weight_scale"] = r["scale"]
        if method.act == "int8-token":
            out["weight"] = (codes.to(torch.int16) - 128).to(torch.int8)
            return out
        out["weight_packed"] = pack_int32(codes, method.bits, dim=1)  # (N, ceil(K/pf))
        out["weight_shape"] = torch.tensor([N, K], dtype=torch.int64)
        if not method.sym:  # zero points: signed + 2^(b-1) = our unsigned zero, packed along N
            out["weight_zero_point"] = pack_int32(r["zero"], method.bits, dim=0)
        if "g_idx" in r:
            out["weight_g_idx"] = r["g_idx"].to(torch.int32)
        return out
    if method.weight == "fp8":
        out["weight"] = r["codes"]
        out["weight_scale"] = r["scale"]
        if "input_scale" in r:
            out["input_scale"] = r["input_scale"].float().reshape(1)
        return out
    out["weight_packed"] = pack_fp4(r["codes"])
    out["weight_scale"] = r["block_scale"]
    out["weight_global_scale"] = r["global_scale"].float().reshape(1)
    if "input_global_scale" in r:
        out["input_global_scale"] = r["input_global_scale"].float().reshape(1)
    return out
