"""FP8 weights (per-tensor, per-channel or 128×128 block scales) with static/dynamic FP8 inputs.

Kernel layout: `weight` (N, K) float8_e4m3fn as stored; `weight_scale` float32 multiplier of shape
(1,) per-tensor, (N,) per-channel (also when fused shards had different per-tensor scales, which
stays exact) or (ceil(N/bn), ceil(K/bk)) per block. `input_scale` (S,) float32, one per shard,
for static activations (shards with different input scales are computed shard by shard).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels import dispatch, reference
from lowbit.quant.schemes.common import (
    TORCH_FLOAT8,
    add_replicated,
    add_shard_scalars,
    loaded_scalars,
    per_row,
    swap_params,
)
from lowbit.quant.spec import PerBlock, PerChannel, PerTensor, QuantSpec


class W8A8Scheme:
    """8-bit weights with a per-tensor/channel/block scale; activations as the spec says."""

    weight_dtype: torch.dtype = torch.float8_e4m3fn
    name = "w8a8_fp8"

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.act = spec.act
        # A dynamic per-tensor activation scale spans every row of the batch — in a CUDA graph
        # the padded rows of the bucket too — so replay would not equal eager: run eagerly.
        self.cuda_graph_safe = self.act is None or self.act.mode != "dynamic_tensor"

    def create_weights(self, layer) -> None:
        """weight (N, K), weight_scale by granularity, input_scale per shard when static."""
        N, K = layer.output_size, layer.input_size
        g = self.spec.granularity
        layer.add_param("weight", torch.empty(N, K, dtype=self.weight_dtype), output_dim=0)
        if isinstance(g, PerTensor):
            add_shard_scalars(layer, "weight_scale")
        elif isinstance(g, PerChannel):
            layer.add_param("weight_scale", torch.empty(N, 1), output_dim=0)
        elif isinstance(g, PerBlock):
            shape = (-(-N // g.n), -(-K // g.k))
            layer.add_param("weight_scale", torch.empty(shape), output_dim=0)
        else:
            raise ValueError(f"{self.name} has no {g} granularity; use tensor, channel or block")
        if self.act is not None and self.act.mode == "static_tensor":
            add_shard_scalars(layer, "input_scale")
        if self.spec.pre_quant_scale:  # SmoothQuant factor, multiplied into the input
            add_replicated(layer, "pre_quant_scale", torch.empty(K, dtype=layer.params_dtype))

    def process_weights_after_loading(self, layer) -> None:
        """Scales to float32; per-shard scalars to one scalar when equal, else per-row."""
        sizes = layer.output_sizes if layer.shard_names else [layer.output_size]
        new: dict[str, Tensor] = {}
        if isinstance(self.spec.granularity, PerTensor):
            ws = loaded_scalars(layer, "weight_scale")
            new["weight_scale"] = ws[:1] if bool((ws == ws[0]).all()) else per_row(ws, sizes)
        else:
            new["weight_scale"] = layer.weight_scale.data.float().reshape(
                -1 if isinstance(self.spec.granularity, PerChannel) else layer.weight_scale.shape
            )
        if "input_scale" in layer._parameters:
            xs = loaded_scalars(layer, "input_scale")
            new["input_scale"] = xs[:1] if bool((xs == xs[0]).all()) else xs
        self.sizes = sizes
        swap_params(layer, ["weight_scale", "input_scale"], **new)

    def fused_input_quant(self) -> tuple[torch.dtype, float] | None:
        """(dtype, qmax) of the per-token dynamic activation quantization that the producing
        kernel may do instead of this GEMM (`Linear.input_quant`); None when the inputs are
        static, per tensor, per group, SmoothQuant-scaled or unquantized."""
        act = self.act
        if act is None or act.mode != "dynamic_token" or self.spec.pre_quant_scale:
            return None
        if isinstance(self.spec.granularity, PerBlock):
            return None
        if self.weight_dtype == torch.int8:
            return torch.int8, float(act.qmax or 127.0)
        if self.weight_dtype == torch.float8_e4m3fn and act.dtype == "fp8_e4m3":
            return torch.float8_e4m3fn, float(act.qmax or 448.0)
        return None

    def apply(self, layer, x: Tensor, bias: Tensor | None) -> Tensor:
        """Per shard when static input scales differ, else one GEMM."""
        if self.spec.pre_quant_scale:
            x = x * layer.pre_quant_scale
        xs = getattr(layer, "input_scale", None)
        if xs is None or xs.numel() == 1:
            return self._gemm(x, layer.weight, layer.weight_scale, xs, bias)
        outs, start = [], 0
        ws = layer.weight_scale
        for i, n in enumerate(self.sizes):
            rows = slice(start, start + n)
            b = None if bias is None else bias[rows]
            w_s = ws if ws.numel() == 1 else ws[rows]
            outs.append(self._gemm(x, layer.weight[rows], w_s, xs[i : i + 1], b))
            start += n
        return torch.cat(outs, dim=-1)

    def _gemm(self, x: Tensor, w: Tensor, ws: Tensor, xs: Tensor | None, bias) -> Tensor:
        """One GEMM with this spec's activation handling."""
        g, act = self.spec.granularity, self.act
        if isinstance(g, PerBlock):
            if act is None:
                return reference.dense_gemm(x, reference.dequant_block(w, ws, (g.n, g.k)), bias)
            return dispatch.fp8_block_gemm(x, w, ws, (g.n, g.k), bias)
        if act is None:
            return reference.dense_gemm(x, w.float() * _col(ws, w.shape[0]), bias)
        if act.mode == "dynamic_tensor":
            xs = x.detach().abs().amax().float().clamp(min=reference.ACT_EPS) / 448.0
        return dispatch.fp8_scaled_mm(x, w, ws, xs, bias)

    def describe(self) -> str:
        """Scheme and kernel for `lowbit inspect`."""
        g = self.spec.granularity
        if isinstance(g, PerBlock):
            return f"{self.name} ({g}) → dispatch.fp8_block_gemm (Triton ≥ sm89, else reference)"
        kind = "weight-only" if self.act is None else str(self.act)
        return f"{self.name} ({g}, {kind}) → dispatch.fp8_scaled_mm (torch._scaled_mm ≥ sm89)"


def _col(ws: Tensor, n: int) -> Tensor:
    """(1,) or (N,) scale → broadcastable (N, 1) / (1, 1)."""
    return ws.float().reshape(-1, 1) if ws.numel() == n else ws.float().reshape(1, 1)


class FP8Scheme(W8A8Scheme):
    """FP8 e4m3 (or e5m2) weights."""

    def __init__(self, spec: QuantSpec):
        super().__init__(spec)
        self.weight_dtype = TORCH_FLOAT8[spec.weight]
