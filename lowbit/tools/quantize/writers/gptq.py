"""GPTQ layout (formats.md §2): codes packed along K, zeros along N; v1 zeros (−1) if sym."""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels.codes import pack_int32
from lowbit.tools.quantize.methods import Method


def _checkpoint_format(method: Method) -> str:
    """v1 ('gptq', zeros −1) for symmetric; v2 for asymmetric, where v1 would overflow at z = 0."""
    return "gptq" if method.sym else "gptq_v2"


def quantization_config(method: Method, opts, ignored: list[str]) -> dict:
    """config.json["quantization_config"] as GPTQModel writes it."""
    fmt = _checkpoint_format(method)
    return {
        "quant_method": "gptq", "bits": method.bits, "group_size": opts.group_size,
        "desc_act": opts.act_order == "group", "sym": method.sym,
        "damp_percent": 0.01, "true_sequential": False,
        "static_groups": opts.act_order == "static", "checkpoint_format": fmt,
        "format": fmt, "pack_dtype": "int32", "lm_head": False,
        # GPTQ never quantizes lm_head (`lm_head: false`); other skipped modules are `-:` rules.
        "dynamic": {f"-:{n.replace('.', '[.]')}$": {} for n in ignored if n != "lm_head"} or None,
        "meta": {"quantizer": ["lowbit:0.1.0"], "damp_percent": 0.01},
    }  # fmt: skip


def extra_files(method: Method, opts, ignored: list[str]) -> dict:
    """No side files."""
    return {}


def linear_tensors(r: dict, method: Method, opts, dtype: torch.dtype) -> dict[str, Tensor]:
    """qweight (K·b/32, N), qzeros (K/G, N·b/32), scales (K/G, N) fp16, g_idx (K,)."""
    codes = r["codes"]  # (N, K)
    N, K = codes.shape
    ng = r["scale"].shape[1]
    zero = r["zero"].long() - (1 if _checkpoint_format(method) == "gptq" else 0)
    g_idx = r.get("g_idx")
    if g_idx is None:
        g_idx = torch.arange(K) // (K // ng)
    return {
        "qweight": pack_int32(codes.T, method.bits, dim=0),  # (K/pf, N)
        "qzeros": pack_int32(zero.T, method.bits, dim=1),  # (ng, N/pf)
        "scales": r["scale"].T.contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }
