"""Bit packing and small-number code tables shared by every quantized layout.

All packers are exact inverses of their unpackers (tests check the round trips bit for bit).
Packed int32 words are reinterpreted as unsigned before shifting (checkpoints store them signed).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between consecutive e2m1 magnitudes; ties go to the even code.
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8j + AWQ_ORDER[i]


def _u32(x: Tensor) -> Tensor:
    """int32 words → int64 holding their unsigned value."""
    return x.to(torch.int64) & 0xFFFFFFFF


def _from_u32(x: Tensor) -> Tensor:
    """int64 unsigned words → int32 with the same bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


_CHUNK = 1 << 22  # values packed/unpacked at once: bounds the int64 scratch to 32 MiB


def _by_rows(fn, x: Tensor, expand: int = 1) -> Tensor:
    """Apply `fn` to row chunks of x (…, L) (rows = all leading dims) and join the results;
    `fn` makes `expand` int64 values of scratch per input value (the chunk bound counts them)."""
    lead, L = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, L)
    step = max(1, _CHUNK // max(L * expand, 1))
    out = torch.cat([fn(rows[i : i + step]) for i in range(0, rows.shape[0], step)])
    return out.reshape(*lead, out.shape[-1])


def pack_int32(q: Tensor, bits: int, dim: int) -> Tensor:
    """Unsigned codes → int32 words along `dim`, value i of a word in bits [b·i, b·i + b)."""
    pf = 32 // bits
    shifts = torch.arange(pf, device=q.device) * bits

    def pack(rows: Tensor) -> Tensor:
        r = rows.to(torch.int64)
        r = torch.nn.functional.pad(r, (0, (-r.shape[-1]) % pf))
        return _from_u32((r.reshape(r.shape[0], -1, pf) << shifts).sum(-1))

    return _by_rows(pack, q.movedim(dim, -1)).movedim(-1, dim)


def unpack_int32(packed: Tensor, bits: int, dim: int, length: int) -> Tensor:
    """Inverse of `pack_int32`: int32 words → unsigned codes (int32), `length` along `dim`."""
    pf = 32 // bits
    shifts = torch.arange(pf, device=packed.device) * bits

    def unpack(rows: Tensor) -> Tensor:
        q = (_u32(rows)[..., None] >> shifts) & (2**bits - 1)  # (r, L/pf, pf)
        return q.reshape(rows.shape[0], -1)[:, :length].to(torch.int32)

    return _by_rows(unpack, packed.movedim(dim, -1), expand=pf).movedim(-1, dim)


def pack_gptq3(q: Tensor, dim: int) -> Tensor:
    """3-bit codes → GPTQ's 3-words-per-32-values layout along `dim` (length % 32 == 0)."""
    q = q.movedim(dim, -1).to(torch.int64)
    q = q.reshape(*q.shape[:-1], -1, 32)  # (…, L/32, 32)
    bitpos = torch.arange(32, device=q.device) * 3  # value v starts at bit 3v of the 96-bit run
    words = []
    for w in range(3):
        lo = bitpos - 32 * w  # shift of each value within word w (may be negative)
        part = torch.where(lo >= 0, q << lo.clamp(min=0), q >> (-lo).clamp(min=0))
        inside = (lo > -3) & (lo < 32)
        words.append(((part * inside).sum(-1)) & 0xFFFFFFFF)
    out = torch.stack(words, -1).reshape(*q.shape[:-2], -1)  # (…, 3L/32)
    return _from_u32(out).movedim(-1, dim)


def unpack_gptq3(packed: Tensor, dim: int, length: int) -> Tensor:
    """Inverse of `pack_gptq3`."""
    w = _u32(packed.movedim(dim, -1))
    w = w.reshape(*w.shape[:-1], -1, 3)  # (…, L/32, 3)
    bitpos = torch.arange(32, device=packed.device) * 3
    vals = torch.zeros(*w.shape[:-1], 32, dtype=torch.int64, device=packed.device)
    for i in range(3):
        lo = bitpos - 32 * i
        part = torch.where(
            lo >= 0, w[..., i : i + 1] >> lo.clamp(min=0), w[..., i : i + 1] << (-lo).clamp(min=0)
        )
        vals |= part * ((lo > -3) & (lo < 32))
    q = (vals & 7).reshape(*vals.shape[:-2], -1)[..., :length]
    return q.to(torch.int32).movedim(-1, dim)


def awq_unpack(packed: Tensor, length: int) -> Tensor:
    """AWQ GEMM words (R, N/8), interleaved nibbles → codes (R, N)."""
    q = unpack_int32(packed, 4, dim=1, length=packed.shape[1] * 8)  # nibble order
    q = q.reshape(q.shape[0], -1, 8)[:, :, _inverse(AWQ_ORDER)]
    return q.reshape(q.shape[0], -1)[:, :length]


def awq_pack(q: Tensor) -> Tensor:
    """Codes (R, N) → AWQ GEMM words (R, N/8)."""
    q = q.reshape(q.shape[0], -1, 8)[:, :, list(AWQ_ORDER)]
    return pack_int32(q.reshape(q.shape[0], -1), 4, dim=1)


def _inverse(order: tuple[int, ...]) -> list[int]:
    """Position of each column offset among the nibbles."""
    return [order.index(c) for c in range(len(order))]


def unpack_fp4(packed: Tensor) -> Tensor:
    """(…, K/2) bytes → (…, K) 4-bit codes; low nibble = even element."""
    p = packed.to(torch.int32)
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*p.shape[:-1], -1)


def pack_fp4(codes: Tensor) -> Tensor:
    """Inverse of `unpack_fp4`."""
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).to(torch.uint8)


def unpack_int4_rows(packed: Tensor) -> Tensor:
    """ModelOpt INT4: (N/2, K) bytes of signed nibbles, low = row 2r → (N, K) int8 in −8..7."""
    p = packed.to(torch.int32)
    lo, hi = p & 0xF, p >> 4
    q = torch.stack([lo, hi], dim=1).reshape(-1, p.shape[1])  # (N, K)
    return torch.where(q >= 8, q - 16, q).to(torch.int8)


def pack_int4_rows(q: Tensor) -> Tensor:
    """Inverse of `unpack_int4_rows`."""
    u = q.to(torch.int32) & 0xF
    return (u[0::2] | (u[1::2] << 4)).to(torch.uint8)


@functools.cache
def _table(values: tuple[float, ...], device: torch.device) -> Tensor:
    """A float32 lookup table on `device`, built once (so the ops below copy nothing from the
    host per call and are CUDA-graph safe after their first eager call)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def e2m1_decode(codes: Tensor) -> Tensor:
    """4-bit e2m1 codes (bit 3 = sign) → float32."""
    table = _table(tuple(E2M1_VALUES), codes.device)
    c = codes.to(torch.int64)
    mag = table[c & 7]
    return torch.where(c >= 8, -mag, mag)


def e2m1_round(x: Tensor) -> Tensor:
    """Round float32 to the nearest e2m1 value (saturating at ±6, ties to the even code)."""
    bounds = _table(tuple(_E2M1_BOUNDS), x.device)
    a = x.abs()
    idx = torch.bucketize(a, bounds, right=False)  # ties fall to the lower code
    odd_tie = (idx < 7) & (a == bounds[idx.clamp(max=6)]) & (idx % 2 == 1)
    idx = idx + odd_tie.to(idx.dtype)
    table = _table(tuple(E2M1_VALUES), x.device)
    return torch.copysign(table[idx], x)


def e8m0_decode(e: Tensor) -> Tensor:
    """uint8 biased exponents → float32 2^(e−127); 0xFF → NaN."""
    v = torch.exp2(e.to(torch.float32) - 127.0)
    return torch.where(e.to(torch.int32) == 255, torch.nan, v)


MX_BLOCK = 32  # OCP MX formats: one e8m0 scale per 32 values


def e8m0_ceil(x: Tensor) -> Tensor:
    """float32 → uint8 biased exponent of the smallest power of two ≥ x (NVIDIA's RCEIL), clamped
    to 2^±127; x ≤ 0 → byte 0 (2^-127), inf/NaN → 127 (2^0). Exact: frexp, not ceil(log2(x)),
    which float32 rounds to the power of two just below it for x a hair above one."""
    x = x.float()
    m, e = torch.frexp(x)  # x = m · 2^e, m in [0.5, 1)
    exp = torch.where(m == 0.5, e - 1, e).clamp(-127, 127)
    exp = torch.where(x > 0, exp, -127)
    exp = torch.where(torch.isfinite(x), exp, 0)
    return (exp + 127).to(torch.uint8)


def nf4_like_decode(packed: Tensor, table: Tensor) -> Tensor:
    """bnb 4-bit bytes (first element in the HIGH nibble) → float32 values from `table`."""
    p = packed.to(torch.int64)
    codes = torch.stack([p >> 4, p & 0xF], dim=-1).reshape(-1)
    return table.float()[codes]
