"""GPTQ (Frantar et al.): column-by-column quantization with second-order error compensation.

Follows AutoGPTQ's `fasterquant` (formats.md §2.5): H = 2/n Σ x xᵀ, dead columns zeroed, optional
act-order, damping, upper Cholesky factor of H⁻¹, blocks of 128 columns with lazy updates.
Group ranges are shrunk by the factor minimizing Σ|Q(w) − w|^2.4 (AutoGPTQ's `mse` option), which
measurably lowers KL against the original (benchmarks/RESULTS.md).

act_order:
- None: natural column order; a group's scale comes from its error-updated columns when it starts.
- "static": columns in descending diag(H) order, group scales fixed up front from the original
  weights (AutoGPTQ `static_groups`, llm-compressor's default `actorder: static`); g_idx stays
  k // G, so nothing extra is stored and every layout can hold it.
- "group": act-order with groups formed in permuted order; writes a non-trivial g_idx.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.quant.numerics import int_codes, int_params_mse


class Hessian:
    """Running H = 2/n Σ x xᵀ over calibration tokens of one linear layer's input."""

    def __init__(self, K: int, device):
        self.H = torch.zeros(K, K, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: Tensor) -> None:
        """Accumulate inputs x (..., K)."""
        x = x.reshape(-1, x.shape[-1]).float()  # (T, K)
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x


def gptq_quantize(
    w: Tensor,
    H: Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype: torch.dtype,
    act_order: str | None = None,
    damp: float = 0.01,
    block: int = 128,
) -> dict:
    """Quantize w (N, K) with Hessian H (K, K) → canonical int result (g_idx when act_order)."""
    W = w.detach().float().clone()
    H = H.detach().float().clone()
    N, K = W.shape
    G = K if group_size in (-1, 0) else group_size
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if act_order not in (None, "static", "group"):
        raise ValueError(f"act_order must be None, 'static' or 'group', got {act_order!r}")
    scale = torch.zeros(N, K // G, device=W.device)
    zero = torch.zeros(N, K // G, device=W.device)
    if act_order == "static":  # groups of original columns, params from the original weights
        scale, zero = int_params_mse(W.reshape(N, K // G, G), bits, sym, scale_dtype)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    # group of the column at each (possibly permuted) position
    # (a Python list: indexing a device tensor per column would sync the GPU K times)
    gcol = ((perm if act_order == "static" else torch.arange(K, device=W.device)) // G).tolist()
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, device=H.device)
    Hinv = _upper_inverse_cholesky(H)

    codes = torch.zeros(N, K, device=W.device)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()  # (N, B)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % G == 0 and act_order != "static":
                # Group params from the current (error-updated) columns of this group.
                src = torch.cat([W1[:, i : i + G], W[:, i2 : i2 + max(0, G - (i2 - col))]], 1)
                s, z = int_params_mse(src, bits, sym, scale_dtype)  # (N,)
                scale[:, col // G], zero[:, col // G] = s, z
            g = gcol[col]
            s, z = scale[:, g], zero[:, g]
            q = int_codes(W1[:, i], s, z, bits)
            codes[:, col] = q
            err = (W1[:, i] - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    out = {"zero": zero.to(torch.int32), "scale": scale.to(scale_dtype)}
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]  # back to the original column order
        if act_order == "group":
            out["g_idx"] = (torch.arange(K, device=W.device) // G)[invperm].to(torch.int32)
    out["codes"] = codes.to(torch.uint8)
    return out


def _upper_inverse_cholesky(H: Tensor) -> Tensor:
    """Upper Cholesky factor of H⁻¹, adding damping until H is positive definite."""
    K = H.shape[0]
    extra = 0.0
    for _ in range(8):
        try:
            L = torch.linalg.cholesky(H + extra * torch.eye(K, device=H.device))
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except torch.linalg.LinAlgError:
            extra = max(extra * 10, 1e-2 * torch.mean(torch.diag(H)).item())
    raise RuntimeError("GPTQ: the Hessian is not positive definite even after extra damping")
