"""Producer-side quantizers written from formats.md, independent of lowbit's loaders.

Each returns (checkpoint tensors of one Linear, float64 dequantized weight (N, K)) so tests can
compare lowbit against an independent float64 reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels.codes import (
    awq_pack,
    e2m1_round,
    pack_fp4,
    pack_gptq3,
    pack_int4_rows,
    pack_int32,
)

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _groups(w: Tensor, g: int) -> Tensor:
    """(N, K) → (N, K/g, g)."""
    return w.reshape(w.shape[0], -1, g)


def int_rtn(w: Tensor, bits: int, g: int, sym: bool):
    """Round-to-nearest group quantization → codes (N, K) unsigned, zeros, scales (N, K/g)."""
    wg = _groups(w.double(), g)
    maxq = 2**bits - 1
    if sym:
        s = wg.abs().amax(-1) * 2 / maxq
        z = torch.full_like(s, 2 ** (bits - 1))
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        s = (hi - lo) / maxq
        z = (-lo / s).round().clamp(0, maxq)
    s = s.to(torch.float16).double()  # checkpoints store fp16 scales
    q = (wg / s[..., None] + z[..., None]).round().clamp(0, maxq)
    deq = ((q - z[..., None]) * s[..., None]).reshape(w.shape)
    return q.reshape(w.shape).long(), z.long(), s, deq


def gptq(w: Tensor, bits: int, g: int, sym: bool, v2: bool = False, g_idx: Tensor | None = None):
    """GPTQ tensors (qweight (K·b/32, N), qzeros, scales (K/g, N), g_idx); v1 stores zero − 1."""
    N, K = w.shape
    if g_idx is None:
        g_idx = torch.arange(K) // g
    perm = torch.argsort(g_idx, stable=True)  # columns of each group, contiguous
    q, z, s, _ = int_rtn(w[:, perm], bits, g, sym)
    codes = torch.empty_like(q)
    codes[:, perm] = q  # back to the original column order
    deq = (codes - z[:, g_idx]).double() * s[:, g_idx]
    zs = z if v2 else z - 1
    pack = (lambda t, d: pack_gptq3(t, d)) if bits == 3 else (lambda t, d: pack_int32(t, bits, d))
    zs = zs & (2**bits - 1)
    t = {
        "qweight": pack(codes.t().contiguous(), 0),
        "qzeros": pack(zs.t().contiguous(), 1),
        "scales": s.t().contiguous().half(),
        "g_idx": g_idx.int(),
    }
    return t, deq


def awq(w: Tensor, g: int):
    """AWQ GEMM tensors (asymmetric)."""
    q, z, s, deq = int_rtn(w, 4, g, sym=False)
    t = {
        "qweight": awq_pack(q.t().contiguous()),
        "qzeros": awq_pack(z.t().contiguous()),
        "scales": s.t().contiguous().half(),
    }
    return t, deq


def ct_pack(w: Tensor, bits: int, g: int, sym: bool):
    """compressed-tensors pack-quantized tensors (signed codes offset by 2^(b−1))."""
    q, z, s, deq = int_rtn(w, bits, g, sym)
    t = {
        "weight_packed": pack_int32(q, bits, 1),
        "weight_scale": s.half(),
        "weight_shape": torch.tensor(list(w.shape)),
    }
    if not sym:
        t["weight_zero_point"] = pack_int32(z, bits, 0)
    return t, deq


def fp8(w: Tensor, granularity: str, block: int = 128):
    """FP8 e4m3 weight + float32 multiplier scale (tensor () / channel (N, 1) / block)."""
    wd = w.double()
    N, K = w.shape
    if granularity == "tensor":
        s = wd.abs().amax() / 448
        full = s.expand(N, K)
    elif granularity == "channel":
        s = wd.abs().amax(1, keepdim=True) / 448
        full = s.expand(N, K)
    else:
        tiles = wd.reshape(N // block, block, K // block, block)
        s = tiles.abs().amax((1, 3)) / 448  # (N/b, K/b)
        full = s.repeat_interleave(block, 0).repeat_interleave(block, 1)
    q = (wd / full).clamp(-448, 448).float().to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": s.float()}, q.double() * full.float().double()


def mxfp8(w: Tensor):
    """ModelOpt MXFP8: e4m3 codes, uint8 e8m0 exponents (N, K/32), 2^ceil(log2(amax/448)) per
    1×32 block (`MXFP8QTensor`), computed here in float64; an all-zero block gets byte 0."""
    g = _groups(w.double(), 32)  # (N, K/32, 32)
    amax = g.abs().amax(-1)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 448)), -127.0).clamp(-127, 127)
    q = (g / torch.exp2(e)[..., None]).clamp(-448, 448).float().to(torch.float8_e4m3fn)
    deq = (q.double() * torch.exp2(e)[..., None]).reshape(w.shape)
    return {"weight": q.reshape(w.shape), "weight_scale": (e + 127).to(torch.uint8)}, deq


def int8_channel(w: Tensor):
    """int8 weight, (N, 1) scale amax/127."""
    s = w.double().abs().amax(1, keepdim=True) / 127
    q = (w.double() / s).round().clamp(-127, 127).to(torch.int8)
    return {"weight": q, "weight_scale": s.float()}, q.double() * s.float().double()


def nvfp4(w: Tensor, modelopt: bool):
    """NVFP4 codes, fp8 scales per 16 elements, a per-tensor scale (CT divides, MO multiplies)."""
    wd = w.double()
    gmult = wd.abs().amax() / (6 * 448)
    bs = (_groups(wd, 16).abs().amax(-1) / 6 / gmult).float().to(torch.float8_e4m3fn)  # (N, K/16)
    scale = bs.double() * gmult
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    v = e2m1_round((_groups(wd, 16) / safe[..., None]).float()).double()
    codes = _e2m1_codes(v).reshape(w.shape)
    deq = (v * scale[..., None]).reshape(w.shape)
    if modelopt:
        t = {"weight": pack_fp4(codes), "weight_scale": bs, "weight_scale_2": gmult.float()}
    else:
        gs = (1 / gmult).float().reshape(1)
        deq = (v * (bs.double() / gs.double())[..., None]).reshape(w.shape)
        t = {"weight_packed": pack_fp4(codes), "weight_scale": bs, "weight_global_scale": gs}
    return t, deq


def _e2m1_codes(v: Tensor) -> Tensor:
    """e2m1 values → 4-bit codes."""
    mag = torch.tensor(E2M1, dtype=v.dtype)
    idx = (v.abs()[..., None] == mag).float().argmax(-1)
    return idx + 8 * (v < 0).long()


def modelopt_int4(w: Tensor, g: int):
    """ModelOpt INT4-AWQ: signed int4 packed along N in bytes, scale amax/7 (N, K/g)."""
    wg = _groups(w.double(), g)
    s = (wg.abs().amax(-1) / 7).float().double()
    q = (wg / s[..., None]).round().clamp(-8, 7)
    deq = (q * s[..., None]).reshape(w.shape)
    return {"weight": pack_int4_rows(q.reshape(w.shape).long()), "weight_scale": s.float()}, deq


def awq_gemv(w: Tensor, g: int):
    """AutoAWQ GEMV tensors: along-K packing, groups per row padded to the kernel's width."""
    from lowbit.quant.schemes.wna16 import gemv_zero_words

    q, z, s, deq = int_rtn(w, 4, g, sym=False)
    N, ng = s.shape
    zw = gemv_zero_words(ng, g)
    zpad = torch.zeros(N, zw * 8, dtype=torch.long)
    zpad[:, :ng] = z
    spad = torch.zeros(N, zw * 8, dtype=torch.float16)
    spad[:, :ng] = s.half()
    t = {"qweight": pack_int32(q, 4, 1), "qzeros": pack_int32(zpad, 4, 1), "scales": spad}
    return t, deq
