"""MXFP8 W8A8: e4m3 weights with one power-of-two (e8m0) scale per 1×32 block along K, and
activations MX-quantized the same way at run time (ModelOpt `quant_algo: "MXFP8"`).

Kernel layout = checkpoint layout: `weight` (N, K) float8_e4m3fn, `weight_scale` (N, K/32) uint8
biased exponents (scale = 2^(byte − 127)). Nothing is repacked, so fused shards (q/k/v, gate/up)
concatenate row-wise and weights stay 8 + 8/32 bits each in memory.

The numerics are `reference.mxfp8_gemm` on every device for now: it dequantizes the weight per
call and simulates the activation quantization exactly. On CUDA that is correct, not fast; a
kernel (native MX GEMM on sm100, or fp8 with per-block rescaling on sm89/90) belongs in
`kernels/dispatch.py`, which this scheme would then call instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels import reference
from lowbit.quant.spec import QuantSpec


class MXFP8Scheme:
    """fp8 e4m3 codes × e8m0 block scales; MX activations when the spec has them."""

    def __init__(self, spec: QuantSpec):
        if spec.group_size != reference.MX_BLOCK:
            raise ValueError(
                f"MXFP8 blocks are {reference.MX_BLOCK} inputs wide, the spec has "
                f"{spec.granularity}"
            )
        if spec.act is not None and spec.act.scale_dtype != "e8m0":
            raise ValueError(f"MXFP8 activations must be MX (e8m0 scales), the spec has {spec.act}")
        self.spec = spec
        self.block = spec.group_size

    def create_weights(self, layer) -> None:
        """weight (N, K) e4m3 and weight_scale (N, K/32) uint8, both split by output rows."""
        N, K = layer.output_size, layer.input_size
        if K % self.block:
            raise ValueError(
                f"{layer.prefix}: K={K} is not a multiple of the MXFP8 block {self.block}"
            )
        layer.add_param("weight", torch.empty(N, K, dtype=torch.float8_e4m3fn), output_dim=0)
        scale = torch.empty(N, K // self.block, dtype=torch.uint8)
        layer.add_param("weight_scale", scale, output_dim=0)

    def process_weights_after_loading(self, layer) -> None:
        """Nothing to repack; an e8m0 NaN byte (0xFF) would poison a whole block, so refuse it."""
        bad = layer.weight_scale.data == 255
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{layer.prefix}.weight_scale[{row}, {col}] is 0xFF, the e8m0 NaN; the "
                "checkpoint's MXFP8 scales are corrupt"
            )

    def apply(self, layer, x: Tensor, bias: Tensor | None) -> Tensor:
        """Reference MXFP8 GEMM (dequantize per call) on every device."""
        return reference.mxfp8_gemm(
            x, layer.weight, layer.weight_scale, bias, self.block, self.spec.act is not None
        )

    def describe(self) -> str:
        """Scheme and kernel for `lowbit inspect`."""
        act = "W8A8, MX e4m3 activations per 1×32" if self.spec.act else "W8A16"
        return (
            f"mxfp8 ({act}, e8m0 scales) → reference.mxfp8_gemm "
            "(dequantize per call on every device; no fast CUDA kernel yet)"
        )
