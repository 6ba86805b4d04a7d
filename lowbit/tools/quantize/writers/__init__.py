"""Writers: canonical quantization results → one producer's on-disk layout (formats.md).

A writer module defines `linear_tensors(result, method, opts) -> {suffix: tensor}` for one
quantized linear, `quantization_config(method, opts, ignored) -> dict` for config.json, and
`extra_files(method, opts, ignored) -> {file name: json-ready dict}`.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

_WRITERS = {
    "compressed-tensors": "lowbit.tools.quantize.writers.compressed_tensors",
    "awq": "lowbit.tools.quantize.writers.awq",
    "gptq": "lowbit.tools.quantize.writers.gptq",
    "modelopt": "lowbit.tools.quantize.writers.modelopt",
}
FORMATS = tuple(_WRITERS)


def get_writer(fmt: str):
    """The writer module of output format `fmt`."""
    if fmt not in _WRITERS:
        raise ValueError(f"unknown --format {fmt!r}; choose one of {', '.join(_WRITERS)}")
    return importlib.import_module(_WRITERS[fmt])


def to_int32(words: Tensor) -> Tensor:
    """Unsigned 32-bit words held in int64 → the same bits as int32 (two's complement)."""
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)


def pack_last(u: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes (R, C) along C, value i of a word at bits [b·i, b·i+b) → int32."""
    pf = 32 // bits
    R, C = u.shape
    u = torch.nn.functional.pad(u.long(), (0, -C % pf))  # zero-pad to a multiple of pf
    u = u.reshape(R, -1, pf)  # (R, ceil(C/pf), pf)
    shifts = torch.arange(pf) * bits
    return to_int32((u << shifts).sum(-1))


def pack_fp4(codes: Tensor) -> Tensor:
    """e2m1 codes (N, K) → uint8 (N, K/2): low nibble = even k, high nibble = odd k."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] & 0xF) | ((c[:, 1::2] & 0xF) << 4)
