"""Online quantization: `--quantization fp8 | w8a8_fp8 | w8a8_int8 | w4a16 | bitsandbytes`.

A full-precision checkpoint is quantized tensor by tensor as it streams in. Each linear weight
(embeddings and norms stay full precision, lm_head too unless `quantize_lm_head`) is cast to
the model dtype and quantized on the target device a few thousand rows at a time, straight into
a checkpoint layout the runtime schemes already read — so an online model runs on exactly the
kernels of the matching pre-quantized checkpoint:

  fp8, w8a8_fp8  e4m3 weights, one scale per output channel (amax / 448), per-token dynamic e4m3
                 activations → `w8a8_fp8` scheme (layout of a per-channel FP8 checkpoint)
  w8a8_int8      int8 weights per output channel and per-token dynamic int8 activations, both
                 amax / 127.5 with codes in [-128, 127] (torchao's symmetric) → `w8a8_int8`
  w4a16          uint4 codes, group 128 along the input, asymmetric (scale = (max − min) / 15,
                 integer zero point; torchao's ASYMMETRIC affine), model-dtype scales → GPTQ v2
                 layout → `wna16` (the AWQ/GPTQ runtime)
  bitsandbytes   nf4 codes, one float32 absmax per 64 consecutive elements (row-major), no
                 double quantization — what vLLM/transformers do in flight → `bnb`

Only a chunk of rows is ever full precision on the device, so the peak during load is the
quantized weights plus one chunk (and the tensor being read, on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lowbit.kernels.codes import NF4_VALUES, pack_int32
from lowbit.quant.numerics import quantize_fp8, quantize_int
from lowbit.quant.spec import ActQuant, PerChannel, PerGroup, QuantPlan, QuantSpec

W4_GROUP = 128
BNB_BLOCK = 64
CHUNK_ELEMENTS = 1 << 24  # float32 rows quantized at once: 64 MiB of scratch
_FP8_ACT = ActQuant("fp8_e4m3", "dynamic_token")
# torchao's symmetric per-token int8: s = amax / 127.5, codes in [-128, 127]
_INT8_ACT = ActQuant("int8", "dynamic_token", qmax=127.5)


@dataclass(frozen=True)
class OnlineMethod:
    """One online method: the spec its modules get and how a float32 row chunk is quantized.

    `quantize(w)` takes rows (n, K) float32 and returns {param: tensor}; `cat_dims[param]` is
    the dimension along which chunks of that param concatenate (the layout's output dim), or
    None for a param every chunk returns alike (a code table).
    """

    name: str
    spec: QuantSpec
    quantize: Callable[[Tensor, torch.dtype], dict[str, Tensor]]
    cat_dims: dict[str, int | None]
    row_multiple: int = 1  # chunks start at multiples of this many rows (packing along N)
    check: Callable[[int, int], str | None] = lambda n, k: None  # why (N, K) cannot, or None


def _fp8(w: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """e4m3 codes and a (n, 1) float32 scale per row."""
    r = quantize_fp8(w, "channel")
    return {"weight": r["codes"], "weight_scale": r["scale"]}


def _int8(w: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """Symmetric int8 per row: s = amax / 127.5, codes round(w / s) in [-128, 127]."""
    r = quantize_int(w, 8, -1, sym=True, scale_dtype=torch.float32)  # unsigned, zero 128
    return {"weight": (r["codes"].to(torch.int16) - 128).to(torch.int8), "weight_scale": r["scale"]}


def _w4a16(w: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """Asymmetric uint4 per 128 inputs, as GPTQ v2 tensors: qweight (K/8, n), qzeros (ng, n/8)."""
    r = quantize_int(w, 4, W4_GROUP, sym=False, scale_dtype=dtype)  # codes (n, K), (n, ng) rest
    return {
        "qweight": pack_int32(r["codes"].t(), 4, dim=0),
        "qzeros": pack_int32(r["zero"].t(), 4, dim=1),
        "scales": r["scale"].t().contiguous(),
    }


def _nf4(w: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """bitsandbytes nf4: blocks of 64 (row-major), absmax-normalized, nearest table entry."""
    blocks = w.reshape(-1, BNB_BLOCK)
    absmax = blocks.abs().amax(1)
    norm = blocks / absmax.clamp_min(1e-12)[:, None]
    table = torch.tensor(NF4_VALUES, device=w.device)
    codes = torch.bucketize(norm, (table[1:] + table[:-1]) / 2).to(torch.uint8).reshape(-1)
    packed = (codes[0::2] << 4) | codes[1::2]  # first element in the high nibble
    return {"weight": packed.reshape(-1, 1), "weight_absmax": absmax.float(),
            "weight_quant_map": table}  # fmt: skip


def _w4_check(n: int, k: int) -> str | None:
    if k % W4_GROUP:
        return f"in_features {k} is not a multiple of the group size {W4_GROUP}"
    if n % 8:
        return f"out_features {n} is not a multiple of 8 (int4 codes pack 8 to a word)"
    return None


_W8 = {"weight": 0, "weight_scale": 0}
_FP8 = OnlineMethod("fp8", QuantSpec("fp8_e4m3", PerChannel(), "fp8", act=_FP8_ACT), _fp8, _W8)
METHODS: dict[str, OnlineMethod] = {
    m.name: m
    for m in (
        _FP8,
        replace(_FP8, name="w8a8_fp8"),  # SGLang's name for the same scheme
        OnlineMethod(
            "w8a8_int8", QuantSpec("int8", PerChannel(), "int8", act=_INT8_ACT), _int8, _W8
        ),
        OnlineMethod(
            "w4a16",
            QuantSpec("int4", PerGroup(W4_GROUP), "gptq_v2", symmetric=False),
            _w4a16,
            {"qweight": 1, "qzeros": 1, "scales": 1},
            row_multiple=8,
            check=_w4_check,
        ),
        OnlineMethod(
            "bitsandbytes",
            QuantSpec("nf4", PerGroup(BNB_BLOCK), "bnb4", scale_dtype="fp32"),
            _nf4,
            {"weight": 0, "weight_absmax": 0, "weight_quant_map": None},
            check=lambda n, k: None if k % BNB_BLOCK == 0 else f"in_features {k} % 64 != 0",
        ),
    )
}


class OnlinePlan(QuantPlan):
    """A QuantPlan whose `rename` quantizes each full-precision linear weight as it arrives."""

    def __init__(self, method: OnlineMethod, lm_head: bool = False):
        spec = method.spec
        super().__init__(
            method=method.name,
            description=f"{method.name} (online, quantized while loading): {spec}"
            + (", lm_head too" if lm_head else ""),
            spec_of=lambda name: spec if self._is_linear(name) else None,
            rename=self._quantize_tensor,
        )
        self.lm_head = lm_head
        self.online = method
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def prepare(self, device, dtype) -> None:
        """Quantize on `device` from `dtype` weights. (A GPU without fp8 tensor cores still gets
        fp8 activations: dispatch runs the W8A8 reference there, as for fp8 checkpoints.)"""
        self.device, self.dtype = torch.device(device), dtype

    def _quantize_tensor(self, name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """`<linear>.weight` → the layout's tensors; everything else passes through."""
        module, _, param = name.rpartition(".")
        if param != "weight" or tensor.dim() != 2 or not self._is_linear(module):
            return [(name, tensor)]
        return [(f"{module}.{k}", v) for k, v in self.quantize(tensor, module).items()]

    def _is_linear(self, module: str) -> bool:
        """Linear projections of decoder layers, and lm_head when asked (never embeddings)."""
        if module == "lm_head":
            return self.lm_head
        return ".layers." in module

    def quantize(self, weight: Tensor, module: str = "weight") -> dict[str, Tensor]:
        """Quantize a (N, K) full-precision weight chunk by chunk on the plan's device."""
        m = self.online
        N, K = weight.shape
        if not weight.dtype.is_floating_point or weight.dtype.itemsize == 1:
            raise ValueError(
                f"{module}: --quantization {m.name} quantizes full-precision weights, but this "
                f"one is {weight.dtype}; is the checkpoint already quantized?"
            )
        reason = m.check(N, K)
        if reason:
            raise ValueError(f"{module} ({N}×{K}) cannot take --quantization {m.name}: {reason}")
        step = max(m.row_multiple, CHUNK_ELEMENTS // K // m.row_multiple * m.row_multiple)
        parts: dict[str, list[Tensor]] = {}
        for r0 in range(0, N, step):
            rows = weight[r0 : r0 + step].to(self.device, self.dtype).float()
            for k, v in m.quantize(rows, self.dtype).items():
                parts.setdefault(k, []).append(v)
            del rows
        return {
            k: v[0] if len(v) == 1 or m.cat_dims[k] is None else torch.cat(v, m.cat_dims[k])
            for k, v in parts.items()
        }


def online_plan(name: str, lm_head: bool = False) -> OnlinePlan:
    """The plan for `--quantization name` on a full-precision checkpoint (lm_head: it too)."""
    return OnlinePlan(METHODS[name], lm_head)
