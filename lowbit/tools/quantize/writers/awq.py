"""AutoAWQ GEMM layout (formats.md §1): int4 packed along N in AWQ's interleaved order, fp16."""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels.codes import awq_pack
from lowbit.tools.quantize.methods import Method


def quantization_config(method: Method, opts, ignored: list[str]) -> dict:
    """config.json["quantization_config"] as AutoAWQ / transformers write it."""
    return {"quant_method": "awq", "bits": 4, "group_size": opts.group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": ignored or None}  # fmt: skip


def extra_files(method: Method, opts, ignored: list[str]) -> dict:
    """No side files."""
    return {}


def linear_tensors(r: dict, method: Method, opts, dtype: torch.dtype) -> dict[str, Tensor]:
    """qweight (K, N/8), qzeros (K/G, N/8), scales (K/G, N) fp16; zeros stored as is."""
    return {
        "qweight": awq_pack(r["codes"].T),
        "qzeros": awq_pack(r["zero"].T),
        "scales": r["scale"].T.contiguous().to(torch.float16),
    }
