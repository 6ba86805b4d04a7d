"""Writers: canonical quantization results → one producer's on-disk layout (formats.md).

A writer module defines `linear_tensors(result, method, opts) -> {suffix: tensor}` for one
quantized linear, `quantization_config(method, opts, ignored) -> dict` for config.json, and
`extra_files(method, opts, ignored) -> {file name: json-ready dict}`. Bit packing is
`lowbit.kernels.codes` (shared with the loaders, which unpack with its exact inverses).
"""

from __future__ import annotations

import importlib

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
