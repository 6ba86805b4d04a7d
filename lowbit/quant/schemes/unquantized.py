"""Full-precision linear: a plain weight of the model's dtype."""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels import dispatch


class UnquantizedScheme:
    """`y = x @ W^T + b` with W (out, in) in the layer's dtype."""

    def create_weights(self, layer) -> None:
        """One (out, in) weight, sharded along the output dim for fused layers."""
        weight = torch.empty(layer.output_size, layer.input_size, dtype=layer.params_dtype)
        layer.add_param("weight", weight, output_dim=0, input_dim=1)

    def process_weights_after_loading(self, layer) -> None:
        """Nothing to repack."""

    def apply(self, layer, x: Tensor, bias: Tensor | None) -> Tensor:
        """A dense matmul (`dispatch.linear`: cuBLAS, or the Triton GEMV for a decode row)."""
        return dispatch.linear(x, layer.weight, bias)

    def describe(self) -> str:
        """Scheme and kernel for `lowbit inspect`."""
        return "unquantized → dispatch.linear (torch F.linear; Triton GEMV at M ≤ GEMV16_MAX_M)"
