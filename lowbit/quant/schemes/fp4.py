"""FP4 (e2m1) weights: NVFP4 (16-element fp8 block scales + a per-tensor scale) and MXFP4
(32-element e8m0 power-of-two scales), weight-only or with NVFP4 activations.

Kernel layout: `weight` (N, K/2) uint8, two e2m1 codes a byte, low nibble = even k; `block_scale`
(N, K/G) as stored (fp8 e4m3 or uint8 e8m0); `row_scale` (N,) float32 per-tensor multiplier of
each row's shard (NVFP4; compressed-tensors' divisor is inverted at load); `input_scale` (S,)
per-shard activation scale (NVFP4 W4A4), kept in the producer's convention (`divisor`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels import dispatch
from lowbit.quant.schemes.common import (
    add_replicated,
    add_shard_scalars,
    loaded_scalars,
    per_row,
    swap_params,
)
from lowbit.quant.spec import QuantSpec

# layout → (packed weight name, block scale name, per-tensor weight scale, input scale, divisor)
NAMES = {
    "ct_nvfp4": (
        "weight_packed",
        "weight_scale",
        "weight_global_scale",
        "input_global_scale",
        True,
    ),
    "ct_mxfp4": ("weight_packed", "weight_scale", None, None, False),
    "modelopt_nvfp4": ("weight", "weight_scale", "weight_scale_2", "input_scale", False),
}


class FP4Scheme:
    """NVFP4 / MXFP4 linear."""

    def __init__(self, spec: QuantSpec):
        if spec.layout not in NAMES:
            raise ValueError(f"fp4 cannot read layout {spec.layout!r}; known: {sorted(NAMES)}")
        self.spec = spec
        self.group = spec.group_size or 16
        self.names = NAMES[spec.layout]
        self.mx = spec.layout == "ct_mxfp4"
        if self.mx and spec.act is not None:
            raise ValueError("MXFP4 activations (W4A4) are not supported; MXFP4A16 is")

    def create_weights(self, layer) -> None:
        """Packed codes, block scales, per-shard tensor scales."""
        N, K = layer.output_size, layer.input_size
        if K % self.group:
            raise ValueError(
                f"{layer.prefix}: K={K} is not a multiple of the fp4 group {self.group}"
            )
        packed, block, wglob, xglob, _ = self.names
        layer.add_param(packed, torch.empty(N, K // 2, dtype=torch.uint8), output_dim=0)
        sdt = torch.uint8 if self.mx else torch.float8_e4m3fn
        layer.add_param(block, torch.empty(N, K // self.group, dtype=sdt), output_dim=0)
        if wglob:
            add_shard_scalars(layer, wglob)
        if self.spec.act is not None:
            add_shard_scalars(layer, xglob)
        if self.spec.pre_quant_scale:
            add_replicated(layer, "pre_quant_scale", torch.empty(K, dtype=layer.params_dtype))

    def process_weights_after_loading(self, layer) -> None:
        """Per-shard tensor scales → one multiplier per row; names → the kernel's."""
        packed, block, wglob, xglob, divisor = self.names
        sizes = layer.output_sizes if layer.shard_names else [layer.output_size]
        new: dict[str, Tensor | None] = {
            "weight": getattr(layer, packed).data,
            "block_scale": getattr(layer, block).data,
            "row_scale": None,
            "input_scale": None,
        }
        if wglob:
            g = loaded_scalars(layer, wglob)
            new["row_scale"] = per_row(1.0 / g if divisor else g, sizes)
        if self.spec.act is not None:
            x = loaded_scalars(layer, xglob)
            if not bool((x == x[0]).all()):
                raise ValueError(
                    f"{layer.prefix}: fused shards have different NVFP4 input scales "
                    f"{x.tolist()}; the producer must share one"
                )
            new["input_scale"] = x[:1]
        swap_params(layer, [packed, block, wglob or "", xglob or ""], **new)

    def apply(self, layer, x: Tensor, bias: Tensor | None) -> Tensor:
        """The FP4 GEMM (codes decoded in the kernel on CUDA, the reference elsewhere)."""
        if self.spec.pre_quant_scale:
            x = x * layer.pre_quant_scale
        return dispatch.fp4_gemm(
            x, layer.weight, layer.block_scale, layer.row_scale, self.group, bias, self.mx,
            layer.input_scale, divisor=self.names[4],
        )  # fmt: skip

    def describe(self) -> str:
        """Scheme and kernel for `lowbit inspect`."""
        kind = "mxfp4" if self.mx else "nvfp4"
        act = "A16" if self.spec.act is None else "A4 (activations simulated in float32)"
        return f"fp4 ({kind} W4{act}) → dispatch.fp4_gemm (Triton decode-in-kernel on CUDA)"
