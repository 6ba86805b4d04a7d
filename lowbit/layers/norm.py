"""RMSNorm, computed in float32 as the HF reference does (fused Triton kernel on CUDA)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.kernels import dispatch


class RMSNorm(nn.Module):
    """`x / rms(x) * weight`, variance in float32, result cast back before the weight."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)

    def forward(self, x: Tensor, residual: Tensor | None = None, quant=None):
        """Normalize `x` (…, size); with `residual`, add it first and also return the sum.

        `quant` is the consumer's `input_quant()` (a W8A8 linear's per-token activation dtype
        and qmax): where the kernels fuse it, the output comes quantized
        (a dispatch.QuantizedActivation)."""
        return dispatch.rms_norm(x, self.weight, self.eps, residual, quant)
