"""AutoAWQ GEMM layout (formats.md §1): int4 packed along N in AWQ's interleaved order, fp16."""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.tools.quantize.methods import Method
from lowbit.tools.quantize.writers import to_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column 8j + AWQ_ORDER[i]


def pack_awq(u: Tensor) -> Tensor:
    """Unsigned 4-bit codes (R, N) → int32 (R, N/8) in AWQ GEMM's interleaved order."""
    R, N = u.shape
    cols = u.long().reshape(R, N // 8, 8)[..., list(AWQ_ORDER)]  # nibble i ← column AWQ_ORDER[i]
    return to_int32((cols << (torch.arange(8) * 4)).sum(-1))


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
        "qweight": pack_awq(r["codes"].T),
        "qzeros": pack_awq(r["zero"].T),
        "scales": r["scale"].T.contiguous().to(torch.float16),
    }
