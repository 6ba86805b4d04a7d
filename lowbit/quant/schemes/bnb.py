"""bitsandbytes 4-bit (nf4 / fp4 code tables, optional double-quantized absmax) and LLM.int8.

Kept as stored: 4-bit `weight` (N·K/2, 1) uint8, flattened row-major with the FIRST element in
the HIGH nibble; `weight_absmax` one scale per 64 elements (uint8 codes into
`weight_nested_quant_map` × `weight_nested_absmax` per 256 + `weight_nested_offset` when double
quantized); `weight_quant_map` the 16-value code table. 8-bit: `weight` (N, K) int8, `SCB` (N,)
row absmax, W = weight · SCB / 127, computed LLM.int8-style (int8 activations per row, outlier
columns above the threshold in float16). `apply` dequantizes per call (reference path).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels import reference
from lowbit.quant.schemes.common import add_replicated, add_shard_scalars, loaded_scalars, per_row
from lowbit.quant.spec import QuantSpec

BLOCK, NESTED = 64, 256


class BnbScheme:
    """bitsandbytes weight-only linear."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.double = spec.scale_dtype == "dq8"

    def create_weights(self, layer) -> None:
        """The tensors bitsandbytes saves (after the format's renames)."""
        N, K = layer.output_size, layer.input_size
        if self.spec.layout == "bnb8":
            layer.add_param("weight", torch.empty(N, K, dtype=torch.int8), output_dim=0)
            layer.add_param("SCB", torch.empty(N), output_dim=0)
            return
        if (N * K) % BLOCK:
            raise ValueError(f"{layer.prefix}: {N}×{K} is not a multiple of the bnb block {BLOCK}")
        nb = N * K // BLOCK
        layer.add_param("weight", torch.empty(N * K // 2, 1, dtype=torch.uint8), output_dim=0)
        adt = torch.uint8 if self.double else torch.float32
        layer.add_param("weight_absmax", torch.empty(nb, dtype=adt), output_dim=0)
        add_replicated(layer, "weight_quant_map", torch.empty(16))
        if self.double:
            layer.add_param("weight_nested_absmax", torch.empty(-(-nb // NESTED)), output_dim=0)
            add_replicated(layer, "weight_nested_quant_map", torch.empty(256))
            add_shard_scalars(layer, "weight_nested_offset")

    def process_weights_after_loading(self, layer) -> None:
        """Per-shard nested offsets → one per absmax block (so shards concatenate)."""
        if self.double:
            sizes = layer.output_sizes if layer.shard_names else [layer.output_size]
            blocks = [n * layer.input_size // BLOCK for n in sizes]
            self.offsets = per_row(loaded_scalars(layer, "weight_nested_offset"), blocks)

    def _absmax(self, layer) -> Tensor:
        """float32 scale of every 64-element block."""
        if not self.double:
            return layer.weight_absmax.float()
        codes = layer.weight_absmax.long()
        nested = layer.weight_nested_absmax.repeat_interleave(NESTED)[: codes.numel()]
        return layer.weight_nested_quant_map[codes] * nested + self.offsets.to(nested.device)

    def apply(self, layer, x: Tensor, bias: Tensor | None) -> Tensor:
        """Dequantize the weight for this call, then a float32 matmul."""
        N, K = layer.output_size, layer.input_size
        if self.spec.layout == "bnb8":
            threshold = self.spec.act.threshold if self.spec.act else 0.0
            return reference.llm_int8_gemm(x, layer.weight, layer.SCB, threshold, bias)
        else:
            w = reference.dequant_bnb4(
                layer.weight, self._absmax(layer), layer.weight_quant_map, BLOCK, (N, K)
            )
        return reference.dense_gemm(x, w, bias)

    def describe(self) -> str:
        """Scheme and kernel for `lowbit inspect`."""
        if self.spec.layout == "bnb8":
            return "bnb LLM.int8 (int8 rows + fp16 outlier columns) → reference.llm_int8_gemm"
        dq = " double-quant" if self.double else ""
        return f"bnb {self.spec.weight}{dq} → reference.dequant_bnb4 + dense_gemm"
