"""Weight-only integer quantization (W2/3/4/8 A16): group- or channel-wise, sym or zero-point.

AWQ (GEMM, GEMV), GPTQ v1/v2 (any of 2/3/4/8 bits, act-order), compressed-tensors pack-quantized,
ModelOpt INT4-AWQ and auto-round all load in their own layout, then repack once into ONE
canonical layout that `kernels.dispatch.wna16_gemm` (Triton on CUDA, reference on CPU) reads:

  qweight  (K, N / P)   int32, P = 32 // cbits; code of (k, n) = (qweight[k, n // P] >> (cbits ·
                        (n % P))) & (2^cbits − 1), unsigned. Packed along N, sequential nibbles.
  scales   (K / G, N)   the model dtype (G = K for per-channel)
  qzeros   (K / G, N / P) int32 packed like qweight, or None: symmetric, zero = 2^(cbits − 1)
  perm     (K,) int64 or None: act-order; qweight row k holds input column perm[k] and
                        x is read as x[..., perm], so groups are contiguous runs of G rows
  W[n, perm[k]] = (code(k, n) − zero(k // G, n)) · scale(k // G, n)

cbits is 4 or 8: 2- and 3-bit codes are stored in 4-bit fields (with explicit zeros), so one
kernel serves every width. Nothing is expanded to full precision in memory.

On CUDA (sm_80+) int4 weights whose shape allows it (N and K multiples of 64, groups of a
multiple of 64 rows) go one step further at load, into the `mma16` layout of
`kernels/mma16.py` (the same codes, reordered so each GPU lane's word is its tensor-core
fragment; qweight is then (N/64, K/16, 32, 4), which `dispatch.wna16_gemm` tells apart). Scales,
zeros and perm keep the layout above. LOWBIT_WNA16_MMA=0 stops at the canonical layout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.kernels import dispatch
from lowbit.kernels.codes import (
    awq_unpack,
    pack_int32,
    unpack_gptq3,
    unpack_int4_rows,
    unpack_int32,
)
from lowbit.kernels.mma16 import pack_mma16
from lowbit.quant.schemes.common import add_replicated, num_shards, swap_params
from lowbit.quant.spec import QuantSpec

LAYOUTS = ("gptq", "gptq_v2", "awq", "awq_gemv", "ct_pack", "modelopt_int4")


def gemv_zero_words(groups: int, group_size: int) -> int:
    """AutoAWQ GEMV's qzeros width: ceil(groups / 8) rounded up to 1, 2 or 4 words."""
    mult = 1 if group_size >= 128 else 2 if group_size == 64 else 4
    words = math.ceil(groups / 8)
    return math.ceil(words / mult) * mult


class WNA16Scheme:
    """Integer weight-only linear over the canonical packed layout above."""

    def __init__(self, spec: QuantSpec):
        if spec.layout not in LAYOUTS:
            raise ValueError(f"wna16 cannot read layout {spec.layout!r}; known: {LAYOUTS}")
        self.spec = spec
        self.bits = spec.bits
        self.cbits = self.bits if self.bits in (4, 8) else 4

    def create_weights(self, layer) -> None:
        """The checkpoint-layout params of this spec's layout (repacked after loading)."""
        s, b = self.spec, self.bits
        N, K = layer.output_size, layer.input_size
        self.group = s.group_size if s.group_size and s.group_size > 0 else K
        ng, i32 = math.ceil(K / self.group), torch.int32
        if s.layout in ("gptq", "gptq_v2"):
            layer.add_param("qweight", torch.empty(K * b // 32, N, dtype=i32), output_dim=1)
            layer.add_param("qzeros", torch.empty(ng, N * b // 32, dtype=i32), output_dim=1)
            layer.add_param("scales", torch.empty(ng, N, dtype=layer.params_dtype), output_dim=1)
            add_replicated(layer, "g_idx", torch.empty(K, dtype=i32), optional=True)
        elif s.layout == "awq":
            layer.add_param("qweight", torch.empty(K, N // 8, dtype=i32), output_dim=1)
            layer.add_param("qzeros", torch.empty(ng, N // 8, dtype=i32), output_dim=1)
            layer.add_param("scales", torch.empty(ng, N, dtype=layer.params_dtype), output_dim=1)
        elif s.layout == "awq_gemv":  # packed along K, groups along the row, zero padded
            zw = gemv_zero_words(ng, self.group)
            layer.add_param("qweight", torch.empty(N, K // 8, dtype=i32), output_dim=0)
            layer.add_param("qzeros", torch.empty(N, zw, dtype=i32), output_dim=0)
            scales = torch.empty(N, zw * 8, dtype=layer.params_dtype)
            layer.add_param("scales", scales, output_dim=0)
        elif s.layout == "ct_pack":
            pf = 32 // b
            layer.add_param("weight_packed", torch.empty(N, -(-K // pf), dtype=i32), output_dim=0)
            layer.add_param(
                "weight_scale", torch.empty(N, ng, dtype=layer.params_dtype), output_dim=0
            )
            if not s.symmetric:
                zp = torch.empty(-(-N // pf), ng, dtype=i32)
                layer.add_param("weight_zero_point", zp, output_dim=0)
            if s.act_order:
                add_replicated(layer, "weight_g_idx", torch.empty(K, dtype=i32), optional=True)
            shape = torch.zeros(num_shards(layer), 2, dtype=torch.int64)
            layer.add_param("weight_shape", shape, shard_indexed=True)
        else:  # modelopt_int4
            layer.add_param("weight", torch.empty(N // 2, K, dtype=torch.uint8), output_dim=0)
            layer.add_param(
                "weight_scale", torch.empty(N, ng, dtype=layer.params_dtype), output_dim=0
            )
        if s.pre_quant_scale:
            add_replicated(layer, "pre_quant_scale", torch.empty(K, dtype=layer.params_dtype))

    def process_weights_after_loading(self, layer) -> None:
        """Unpack the checkpoint layout to codes/zeros/scales, then pack the canonical layout."""
        codes, zeros, scales, g_idx, drop = self._unpack(layer)  # (K, N), (ng, N)|None, (ng, N)
        perm = self._perm(layer, g_idx, scales.shape[0])
        if perm is not None:
            codes = codes[perm]
        if zeros is None and self.cbits != self.bits:
            zeros = torch.full_like(scales, 2 ** (self.bits - 1), dtype=torch.int32)
        qweight = pack_int32(codes, self.cbits, dim=1)
        K, N = codes.shape
        # the small-M tensor-core kernel's own layout where it runs (CUDA, shapes it takes)
        if dispatch.wna16_mma_layout(qweight.device, N, K, self.group, self.cbits):
            qweight = pack_mma16(qweight)
        swap_params(
            layer,
            drop,
            qweight=qweight,
            scales=scales.to(layer.params_dtype).contiguous(),
            qzeros=None if zeros is None else pack_int32(zeros, self.cbits, dim=1),
            perm=perm,
        )

    def _unpack(self, layer):
        """Checkpoint layout → codes (K, N), zeros (ng, N) | None, scales (ng, N), g_idx, drop."""
        s, b = self.spec, self.bits
        N, K = layer.output_size, layer.input_size
        if s.layout in ("gptq", "gptq_v2"):
            if b == 3:
                codes = unpack_gptq3(layer.qweight.data, 0, K)
                zeros = unpack_gptq3(layer.qzeros.data, 1, N)
            else:
                codes = unpack_int32(layer.qweight.data, b, 0, K)
                zeros = unpack_int32(layer.qzeros.data, b, 1, N)
            if s.layout == "gptq":  # v1 stores zero − 1
                zeros = (zeros + 1) & (2**b - 1)
            g_idx = layer.g_idx.data if _any(layer, "g_idx") else None
            drop = ["qweight", "qzeros", "scales", "g_idx"]
            return codes, self._sym(zeros), layer.scales.data, g_idx, drop
        if s.layout == "awq":
            codes, zeros = awq_unpack(layer.qweight.data, N), awq_unpack(layer.qzeros.data, N)
            return codes, self._sym(zeros), layer.scales.data, None, ["qweight", "qzeros", "scales"]
        if s.layout == "awq_gemv":
            ng = -(-K // self.group)
            codes = unpack_int32(layer.qweight.data, 4, 1, K).t()  # (K, N)
            zeros = unpack_int32(layer.qzeros.data, 4, 1, ng).t()  # (ng, N)
            scales = layer.scales.data[:, :ng].t()
            drop = ["qweight", "qzeros", "scales"]
            return codes.contiguous(), self._sym(zeros.contiguous()), scales, None, drop
        if s.layout == "ct_pack":
            self._check_shapes(layer)
            codes = unpack_int32(layer.weight_packed.data, b, 1, K).t()  # (K, N), offset +2^(b-1)
            zeros = None
            if not s.symmetric:
                zp = unpack_int32(layer.weight_zero_point.data, b, 0, N)  # (N, ng), offset +2^(b-1)
                zeros = zp.t().contiguous()
            g_idx = layer.weight_g_idx.data if _any(layer, "weight_g_idx") else None
            drop = ["weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"]
            drop.append("weight_shape")
            return codes.contiguous(), zeros, layer.weight_scale.data.t(), g_idx, drop
        q = unpack_int4_rows(layer.weight.data).t().to(torch.int32) + 8  # (K, N)
        return q.contiguous(), None, layer.weight_scale.data.t(), None, ["weight", "weight_scale"]

    def _sym(self, zeros: Tensor) -> Tensor | None:
        """Drop zero points that all equal the symmetric midpoint (stored sym checkpoints)."""
        if self.cbits == self.bits and bool((zeros == 2 ** (self.bits - 1)).all()):
            return None
        return zeros

    def _perm(self, layer, g_idx: Tensor | None, ng: int) -> Tensor | None:
        """Act-order: the sort of K by group, checked; None when groups are already contiguous."""
        if g_idx is None:
            return None
        K, G = layer.input_size, self.group
        name = f"{layer.prefix}.g_idx"
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= ng:
            raise ValueError(
                f"{name} has group indices in [{int(g_idx.min())}, "
                f"{int(g_idx.max())}] but the layer has {ng} groups; the checkpoint "
                "is corrupt"
            )
        g = g_idx.to(torch.int64)
        if torch.equal(g, torch.arange(K, device=g.device) // G):
            return None
        counts = torch.bincount(g, minlength=ng)
        if K % G or bool((counts != G).any()):
            raise ValueError(
                f"{name}: every group must hold exactly {G} columns for act-order; "
                f"counts are {counts.tolist()[:8]}…"
            )
        return torch.argsort(g, stable=True)

    def _check_shapes(self, layer) -> None:
        """compressed-tensors' weight_shape must equal each shard's (N_i, K)."""
        sizes = layer.output_sizes if layer.shard_names else [layer.output_size]
        for i, n in enumerate(sizes):
            got = tuple(int(v) for v in layer.weight_shape.data[i])
            if got != (n, layer.input_size):
                raise ValueError(
                    f"{layer.prefix}.weight_shape is {got}, the model expects "
                    f"{(n, layer.input_size)}"
                )

    def apply(self, layer, x: Tensor, bias: Tensor | None) -> Tensor:
        """Weight-only GEMM over the packed layout (canonical, or mma16 on CUDA)."""
        if self.spec.pre_quant_scale:
            x = x * layer.pre_quant_scale
        return dispatch.wna16_gemm(
            x, layer.qweight, layer.scales, layer.qzeros, self.group, self.cbits, bias, layer.perm
        )

    def describe(self) -> str:
        """Scheme and kernel for `lowbit inspect`."""
        return (
            f"wna16 (int{self.bits}) → dispatch.wna16_gemm (Triton on CUDA, reference on CPU; "
            "int4 on sm_80+ in the mma16 layout, tensor cores at small M)"
        )


def _any(layer, name: str) -> bool:
    """Whether any shard of `name` came from the checkpoint."""
    return any(p == name for p, _ in layer.loaded)
