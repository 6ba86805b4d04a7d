"""INT8 weights (per-channel or per-tensor) with dynamic per-token or static per-tensor INT8 inputs.

Same parameter layout as `w8a8_fp8` with an int8 weight. compressed-tensors divides the
activation absmax by 127.5 (its (qmax − qmin) / 2), so that spec carries `act.qmax`, which the
kernels take as the divisor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels import dispatch
from lowbit.quant.schemes.w8a8_fp8 import W8A8Scheme


class Int8Scheme(W8A8Scheme):
    """INT8 W8A8."""

    weight_dtype = torch.int8
    name = "w8a8_int8"

    def _gemm(self, x: Tensor, w: Tensor, ws: Tensor, xs: Tensor | None, bias) -> Tensor:
        """One int8 GEMM (dynamic per-token inputs when `xs` is None)."""
        ws = ws.float().expand(w.shape[0]) if ws.numel() == 1 else ws
        qmax = self.act.qmax if self.act is not None else None
        return dispatch.int8_gemm(x, w, ws, xs, bias, qmax)

    def describe(self) -> str:
        """Scheme and kernel for `lowbit inspect`."""
        return f"w8a8_int8 ({self.spec.granularity}, {self.act}) → dispatch.int8_gemm"
