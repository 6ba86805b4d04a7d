"""Quantize / dequantize one weight matrix into canonical form, and fake-quantize activations.

A canonical result is a dict of tensors that writers turn into any on-disk format:

- int:   `codes` uint8 (N, K) in [0, 2^b), `zero` int32 (N, ng), `scale` (N, ng), optional
         `g_idx` int32 (K,);  W[n, k] = (codes - zero[n, g(k)]) · scale[n, g(k)]
- fp8:   `codes` float8_e4m3fn (N, K), `scale` fp32 (1,) | (N, 1) | (N/bn, K/bk)
- nvfp4: `codes` uint8 (N, K) e2m1 codes 0..15, `block_scale` float8_e4m3fn (N, K/16),
         `global_scale` fp32 (1,) (compressed-tensors' divisor);
         W = e2m1(codes) · block_scale / global_scale

Scales are rounded to their on-disk dtype before codes are computed, so dequantizing what a
writer stores reproduces exactly the weights the calibration used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels.codes import e2m1_decode

FP8_MAX = 448.0
FP4_MAX = 6.0
NVFP4_GROUP = 16
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_E2M1_TIES_UP = (0.75, 1.75, 3.5)  # round-half-to-even in code space (ModelOpt)


def group_index(K: int, group_size: int, g_idx: Tensor | None = None) -> Tensor:
    """Group of each input column (K,): g_idx if given, else k // G."""
    return g_idx.long() if g_idx is not None else torch.arange(K) // group_size


def int_params(w: Tensor, bits: int, sym: bool, scale_dtype: torch.dtype):
    """Scale and zero for rows of `w` (..., G) → (...,) each; zero in [0, 2^b)."""
    maxq = 2**bits - 1
    if sym:
        # compressed-tensors / GPTQ symmetric: s = amax / (maxq / 2), zero = 2^(b-1).
        scale = w.abs().amax(-1) / (maxq / 2)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = w.amin(-1).clamp(max=0)
        hi = w.amax(-1).clamp(min=0)
        scale = (hi - lo) / maxq
    scale = scale.clamp_min(1e-6).to(scale_dtype).float()
    if not sym:
        zero = (-lo / scale).round().clamp(0, maxq)
    return scale, zero


def int_params_mse(w: Tensor, bits: int, sym: bool, scale_dtype, grid: int = 20,
                   max_shrink: float = 0.2, norm: float = 2.4):  # fmt: skip
    """Like int_params, but shrink each row-group's range by the factor (1 → 1 - max_shrink)
    minimizing Σ|Q(w) - w|^norm (GPTQ's `mse` option); w (..., G) → scale, zero (...,)."""
    best_s, best_z = int_params(w, bits, sym, scale_dtype)
    best_err = _qerr(w, best_s, best_z, bits, norm)
    for i in range(1, grid + 1):
        p = 1 - max_shrink * i / grid
        s, z = int_params(w * p, bits, sym, scale_dtype)
        err = _qerr(w, s, z, bits, norm)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def _qerr(w: Tensor, s: Tensor, z: Tensor, bits: int, norm: float) -> Tensor:
    """Σ over the last dim of |dequant(quant(w)) - w|^norm."""
    q = int_codes(w, s[..., None], z[..., None], bits)
    return ((q - z[..., None]) * s[..., None] - w).abs().pow(norm).sum(-1)


def int_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """codes = clamp(round(w / s) + z, 0, 2^b - 1), broadcasting s and z against w."""
    return (torch.round(w / scale) + zero).clamp(0, 2**bits - 1)


def quantize_int(w: Tensor, bits: int, group_size: int, sym: bool, scale_dtype) -> dict:
    """Round-to-nearest group-wise (or per-channel with group_size = K) integer quantization."""
    N, K = w.shape
    G = K if group_size in (-1, 0) else group_size
    wg = w.float().reshape(N, K // G, G)  # (N, ng, G)
    scale, zero = int_params(wg, bits, sym, scale_dtype)  # (N, ng)
    codes = int_codes(wg, scale[..., None], zero[..., None], bits).reshape(N, K)
    return {"codes": codes.to(torch.uint8), "zero": zero.to(torch.int32),
            "scale": scale.to(scale_dtype)}  # fmt: skip


def dequant_int(r: dict) -> Tensor:
    """(codes - zero) · scale per group → fp32 (N, K)."""
    N, K = r["codes"].shape
    ng = r["scale"].shape[1]
    gi = group_index(K, K // ng, r.get("g_idx"))
    z = r["zero"].float()[:, gi]
    return (r["codes"].float() - z) * r["scale"].float()[:, gi]


def fp8_cast(x: Tensor) -> Tensor:
    """Saturating cast to float8_e4m3fn."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _expand_block(scale: Tensor, N: int, K: int, bn: int, bk: int) -> Tensor:
    """Block scales (ceil(N/bn), ceil(K/bk)) → per-element (N, K)."""
    return scale.repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]


def quantize_fp8(
    w: Tensor, strategy: str, scale_dtype=torch.float32, block=(128, 128), amax=None
) -> dict:
    """FP8 e4m3 weights, scale = amax / 448 per tensor / channel / (bn × bk) block.

    `amax` overrides the per-tensor amax (ModelOpt equalises it over fused q/k/v, gate/up).
    """
    w = w.float()
    N, K = w.shape
    if strategy == "tensor":
        a = w.abs().amax() if amax is None else amax
        scale = (a / FP8_MAX).clamp_min(1e-12).reshape(1)
        full = scale
    elif strategy == "channel":
        scale = (w.abs().amax(1, keepdim=True) / FP8_MAX).clamp_min(1e-12)  # (N, 1)
        full = scale
    elif strategy == "block":
        bn, bk = block
        pn, pk = -N % bn, -K % bk
        wp = torch.nn.functional.pad(w, (0, pk, 0, pn))  # zero-padded edge blocks
        tiles = wp.reshape((N + pn) // bn, bn, (K + pk) // bk, bk)
        scale = (tiles.abs().amax((1, 3)) / FP8_MAX).clamp_min(1e-12)  # (N/bn, K/bk)
        full = _expand_block(scale, N, K, bn, bk)
    else:
        raise ValueError(f"unknown fp8 strategy {strategy!r}; use tensor, channel or block")
    scale = scale.to(scale_dtype)
    full = full.to(scale_dtype).float()
    return {"codes": fp8_cast(w / full), "scale": scale}


def dequant_fp8(r: dict, block=(128, 128)) -> Tensor:
    """codes · scale with the scale's strategy broadcast → fp32 (N, K)."""
    q = r["codes"].float()
    s = r["scale"].float()
    N, K = q.shape
    if s.numel() == 1 or s.shape == (N, 1):
        return q * s
    return q * _expand_block(s, N, K, *block)


def e2m1_codes(x: Tensor) -> Tensor:
    """Nearest e2m1 code (0..15, bit 3 = sign) of each value of x (already in [-6, 6])."""
    a = x.abs()
    idx = torch.bucketize(a, _E2M1_BOUNDS.to(a.device))  # ties round down...
    for b in _E2M1_TIES_UP:  # ...except these, which round up (half-to-even in code space)
        idx = idx + (a == b).long()
    return (idx + 8 * (x < 0).long()).to(torch.uint8)


def e2m1_values(codes: Tensor) -> Tensor:
    """e2m1 code → value (fp32)."""
    return e2m1_decode(codes)


def nvfp4_global_scale(amax: Tensor) -> Tensor:
    """compressed-tensors' divisor global scale 448·6 / amax, fp32 (1,)."""
    return (FP8_MAX * FP4_MAX / amax.float().clamp_min(1e-12)).reshape(1)


def quantize_nvfp4(w: Tensor, global_scale: Tensor) -> dict:
    """NVFP4: e2m1 codes with fp8 scales per 16 input columns and one fp32 global scale."""
    N, K = w.shape
    if K % NVFP4_GROUP:
        raise ValueError(f"NVFP4 needs in_features divisible by 16, got {K}")
    wg = w.float().reshape(N, K // NVFP4_GROUP, NVFP4_GROUP)  # (N, K/16, 16)
    block = fp8_cast(global_scale * wg.abs().amax(-1) / FP4_MAX)  # (N, K/16)
    eff = block.float() / global_scale  # dequant multiplier per block
    safe = torch.where(eff == 0, torch.ones_like(eff), eff)
    x = (wg / safe[..., None]).clamp(-FP4_MAX, FP4_MAX)
    codes = torch.where(eff[..., None] == 0, torch.zeros_like(x), x)
    return {"codes": e2m1_codes(codes).reshape(N, K), "block_scale": block,
            "global_scale": global_scale.float().reshape(1)}  # fmt: skip


def dequant_nvfp4(r: dict) -> Tensor:
    """e2m1 · block_scale / global_scale → fp32 (N, K)."""
    N, K = r["codes"].shape
    v = e2m1_values(r["codes"]).reshape(N, K // NVFP4_GROUP, NVFP4_GROUP)
    s = r["block_scale"].float() / r["global_scale"].float()
    return (v * s[..., None]).reshape(N, K)


def dequantize(kind: str, r: dict, block=(128, 128)) -> Tensor:
    """Dense fp32 weight (N, K) of a canonical result of `kind` ('int', 'fp8', 'nvfp4')."""
    if kind == "int":
        return dequant_int(r)
    if kind == "fp8":
        return dequant_fp8(r, block)
    return dequant_nvfp4(r)


def fake_quant_activation(x: Tensor, act: str, scale: Tensor | None = None) -> Tensor:
    """Quantize-dequantize activations x (..., K) the way the runtime scheme `act` does."""
    xf = x.float()
    if act == "fp8-token":
        s = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
        return (fp8_cast(xf / s).float() * s).to(x.dtype)
    if act == "fp8-static":
        return (fp8_cast(xf / scale).float() * scale).to(x.dtype)
    if act == "fp8-group128":
        K = xf.shape[-1]
        xg = xf.reshape(*xf.shape[:-1], K // 128, 128)
        s = (xg.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
        return (fp8_cast(xg / s).float() * s).reshape(xf.shape).to(x.dtype)
    if act == "int8-token":
        # compressed-tensors symmetric int8: s = amax / 127.5, codes in [-128, 127]
        s = (xf.abs().amax(-1, keepdim=True) / 127.5).clamp_min(1e-12)
        return ((xf / s).round().clamp(-128, 127) * s).to(x.dtype)
    if act == "nvfp4":
        flat = xf.reshape(-1, xf.shape[-1])
        out = dequant_nvfp4(quantize_nvfp4(flat, scale))
        return out.reshape(xf.shape).to(x.dtype)
    raise ValueError(f"unknown activation quantization {act!r}")
