"""The runtime-scheme contract every linear layer calls, and the scheme registry.

A scheme owns a linear layer's parameters: it creates them (packed codes, scales, zeros…) with
`layer.add_param`, repacks them once after loading, and computes `y = x @ W^T + b` from them.
Layers know nothing about formats; formats know nothing about kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from lowbit.layers.linear import LinearBase


class QuantScheme(Protocol):
    """The three methods a linear layer calls on its scheme."""

    def create_weights(self, layer: LinearBase) -> None:
        """Register the layer's parameters (with their loaders) via `layer.add_param`."""

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """Repack the loaded parameters once into the kernel's layout."""

    def apply(self, layer: LinearBase, x: Tensor, bias: Tensor | None) -> Tensor:
        """`x (..., in) → (..., out)` for this layer."""

    def describe(self) -> str:
        """One line for `lowbit inspect`: scheme and kernel."""


# Scheme name → "module:Class", imported lazily so a missing optional backend costs nothing.
_SCHEMES: dict[str, str] = {
    "unquantized": "lowbit.quant.schemes.unquantized:UnquantizedScheme",
    "wna16": "lowbit.quant.schemes.wna16:WNA16Scheme",
    "w8a8_fp8": "lowbit.quant.schemes.w8a8_fp8:FP8Scheme",
    "w8a8_int8": "lowbit.quant.schemes.w8a8_int8:Int8Scheme",
    "fp4": "lowbit.quant.schemes.fp4:FP4Scheme",
    "mxfp8": "lowbit.quant.schemes.mxfp8:MXFP8Scheme",
    "bnb": "lowbit.quant.schemes.bnb:BnbScheme",
}


def register_scheme(name: str, target: str) -> None:
    """Register a scheme class under `name` as "module:Class"."""
    _SCHEMES[name] = target


def scheme_class(name: str) -> type:
    """Look up a scheme class by name; a failed lookup lists what exists."""
    if name not in _SCHEMES:
        raise KeyError(f"unknown quantization scheme {name!r}; known: {sorted(_SCHEMES)}")
    module, cls = _SCHEMES[name].split(":")
    return getattr(importlib.import_module(module), cls)
