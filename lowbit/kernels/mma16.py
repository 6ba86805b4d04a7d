"""The `mma16` layout of int4 weights (CUDA, sm_80+): each lane's 32-bit word is exactly its eight
values of an `mma.m16n8k16` A fragment, so the small-M tensor-core kernel
(`triton/wna16_mma.py`) dequantizes a word in registers and feeds it to the MMA with no data
moved between lanes. Pure torch: packing at load, unpacking, the asm's decode table, and a
lane-by-lane emulation of the fragments for the CPU tests.

Layout of a (K, N) int4 weight W[n, k] = code q(k, n) (K % 64 == 0, N % 64 == 0):

  qweight (N/64, K/16, 32, 4) int32: word [cg, ks, lane, j] belongs to column tile n0 =
  64 cg + 16 j and k16 step ks = 4 blk + s; lane = 4 g + c; nibble i = h + 2 kh + 4 kl holds
  W[n0 + g + 8 h, 64 blk + 16 c + 4 s + 2 kh + kl].

The MMA sees that word as the A fragment of the PTX ISA (a0, a1: row g, k 2c, 2c+1; a2, a3: row
g + 8; a4..a7: k + 8), with its k columns 2 c + 8 kh + kl standing for the rows above: any
permutation of k works when x uses the same one, and this one gives a lane 16 contiguous x
values a 64-row block (two vector loads). A lane's 16 bytes are its words for the four column
tiles of a 64-column group, so a warp reads 512 contiguous bytes a load. Scales (K/G, N) and
zeros (K/G, N/8) stay in the canonical layout of `triton/wna16_gemm.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def supported(N: int, K: int, group_size: int, bits: int) -> bool:
    """Whether a weight can take the `mma16` layout: int4, N a multiple of 64, K of 16, and
    groups of a multiple of 16 rows (or one group)."""
    G = K if group_size in (-1, 0) else group_size
    return bits == 4 and N % 64 == 0 and K % 64 == 0 and G % 64 == 0 and K % G == 0


def pack_mma16(qweight: Tensor) -> Tensor:
    """The canonical int4 qweight (K, N/8) int32 (nibble n % 8 of word n // 8) in the `mma16`
    layout (N/64, K/16, 32, 4) int32; any device, pure tensor ops."""
    K, NW = qweight.shape
    N = NW * 8
    assert qweight.dtype == torch.int32 and K % 64 == 0 and N % 64 == 0, (qweight.shape,)
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    codes = ((qweight[:, :, None] >> shifts) & 0xF).to(torch.uint8)  # (K, N/8, 8): (k, n)
    w = codes.reshape(K, N).t()  # W[n, k]
    # n = 64 cg + 16 j + 8 h + g,  k = 64 blk + 16 c + 4 s + 2 kh + kl  (step ks = 4 blk + s)
    w = w.reshape(N // 64, 4, 2, 8, K // 64, 4, 4, 2, 2)  # cg j h g blk c s kh kl
    w = w.permute(0, 4, 6, 3, 5, 1, 8, 7, 2)  # cg blk s g c j kl kh h  (nibble h + 2 kh + 4 kl)
    w = w.reshape(N // 64, K // 16, 32, 4, 8)
    words = torch.zeros(w.shape[:-1], dtype=torch.int32, device=qweight.device)
    for i in range(8):  # int32 shifts wrap: nibble 7 lands in the sign bit
        words |= w[..., i].to(torch.int32) << (4 * i)
    return words


def unpack_mma16(qmma: Tensor) -> Tensor:
    """Inverse of `pack_mma16`: the canonical (K, N/8) int32 qweight."""
    ncg, nks = qmma.shape[:2]
    N, K = ncg * 64, nks * 16
    shifts = torch.arange(0, 32, 4, device=qmma.device, dtype=torch.int32)
    w = (qmma[..., None] >> shifts) & 0xF  # cg ks lane j nibble
    w = w.reshape(ncg, nks // 4, 4, 8, 4, 4, 2, 2, 2)  # cg blk s g c j kl kh h
    w = w.permute(0, 5, 8, 3, 1, 4, 2, 7, 6).reshape(N, K)  # cg j h g blk c s kh kl
    codes = w.t().reshape(K, N // 8, 8).to(torch.int64)
    words = (codes << (4 * torch.arange(8, device=qmma.device))).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)


def _halves(v: Tensor, fp16: bool) -> tuple[Tensor, Tensor]:
    """The two 16-bit floats (low, high) of int64 bit patterns v, as float64."""
    dt = torch.float16 if fp16 else torch.bfloat16
    lo = (v & 0xFFFF).to(torch.int32).to(torch.int16)  # wraps to the same 16 bits
    hi = ((v >> 16) & 0xFFFF).to(torch.int32).to(torch.int16)
    return lo.view(dt).double(), hi.view(dt).double()


# How the asm turns a word into the A fragment's four registers (r0: a0 a1, r1: a2 a3, r2: a4 a5,
# r3: a6 a7): r_i = fma(lop3(w >> shift, mask, magic), mul, nz) with nz = -(offset + zero) of
# the register's row (r0, r2: row g, offset OFFSET[0]; r1, r3: row g + 8, OFFSET[1]). A code
# at mantissa bits 0-3 under the magic 2^10 (fp16) / 2^7 (bf16) reads as magic + q exactly;
# fp16's 10 mantissa bits also hold a code at bits 4-7 (magic + 16 q, hence mul 1/16), bf16's 7
# do not (its bit 7 is the exponent's), so bf16 shifts instead. `emulate` runs this table.
DECODE = {
    True: [(0, 0x000F000F, 0x64006400, 1.0), (0, 0x00F000F0, 0x64006400, 1 / 16),
           (8, 0x000F000F, 0x64006400, 1.0), (8, 0x00F000F0, 0x64006400, 1 / 16)],
    False: [(0, 0x000F000F, 0x43004300, 1.0), (4, 0x000F000F, 0x43004300, 1.0),
            (8, 0x000F000F, 0x43004300, 1.0), (12, 0x000F000F, 0x43004300, 1.0)],
}  # fmt: skip
OFFSET = {True: (1024.0, 64.0), False: (128.0, 128.0)}  # (rows g, rows g + 8)
HALF = {1.0: ("0x3C003C00", "0x3F803F80"), 1 / 16: ("0x2C002C00", "0x3D803D80")}


def emulate(x: Tensor, qmma: Tensor, scales: Tensor, qzeros: Tensor | None, G: int) -> Tensor:
    """What the kernel computes, lane by lane in float64 (for the CPU tests of the layout and of
    the asm's decode table): each lane's word goes through `DECODE`'s bit operations into the
    A fragment registers, which sit where the PTX ISA's m16n8k16 layout puts them; x enters by
    the B fragment's k order, and the products are summed as the kernel's C fragments are."""
    M, K = x.shape
    fp16 = x.dtype == torch.float16
    ncg = qmma.shape[0]
    N = ncg * 64
    y = torch.zeros(M, N, dtype=torch.float64)
    lanes = torch.arange(32)
    g, c = lanes // 4, lanes % 4
    xd = x.double()
    for cg in range(ncg):
        for j in range(4):
            n0 = 64 * cg + 16 * j
            for ks in range(K // 16):
                grp = (16 * ks) // G
                w = qmma[cg, ks, :, j].to(torch.int64) & 0xFFFFFFFF  # (32,) one word a lane
                a = torch.zeros(32, 16, 16, dtype=torch.float64)  # lane's view of A (row, col)
                for i, (shift, mask, magic, mul) in enumerate(DECODE[fp16]):
                    row = g + 8 * (i % 2)  # r0 a0 a1 | r1 a2 a3 | r2 a4 a5 | r3 a6 a7
                    n = n0 + row
                    z = (
                        torch.full((32,), 8.0, dtype=torch.float64)
                        if qzeros is None
                        else (
                            ((qzeros[grp, n // 8].to(torch.int64) >> (4 * (n % 8))) & 0xF).double()
                        )
                    )
                    nz = -(OFFSET[fp16][i % 2] + z)
                    halves = _halves(((w >> shift) & mask) | magic, fp16)
                    for half, v in enumerate(halves):
                        col = 2 * c + 8 * (i // 2) + half
                        a[lanes, row, col] = (v * mul + nz) * scales[grp, n].double()
                A = a.sum(0)  # each (row, col) is held by exactly one lane
                # the MMA's k column 2 c + 8 kh + kl is row 64 blk + 16 c + 4 s + 2 kh + kl
                kk = torch.arange(16)
                rows = 64 * (ks // 4) + 16 * ((kk % 8) // 2) + 4 * (ks % 4) + 2 * (kk // 8) + kk % 2
                for m in range(M):
                    y[m, n0 : n0 + 16] += A @ xd[m, rows]
    return y
