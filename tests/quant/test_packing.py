"""Bit-exact pack/unpack round trips for every packed layout."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels import codes


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_int32_round_trip(bits, dim):
    q = torch.randint(0, 2**bits, (64, 96))
    packed = codes.pack_int32(q, bits, dim)
    assert packed.dtype == torch.int32
    assert torch.equal(codes.unpack_int32(packed, bits, dim, q.shape[dim]), q.int())


@pytest.mark.parametrize("dim", [0, 1])
def test_gptq3_round_trip_and_layout(dim):
    q = torch.randint(0, 8, (64, 96))
    packed = codes.pack_gptq3(q, dim)
    assert packed.shape[dim] == q.shape[dim] * 3 // 32
    assert torch.equal(codes.unpack_gptq3(packed, dim, q.shape[dim]), q.int())
    # formats.md §2.2: row0 bits 0..29 = values 0..9, bits 30..31 = low 2 bits of value 10
    col = torch.arange(32) % 8
    w0 = int(codes.pack_gptq3(col[:, None], 0)[0, 0]) & 0xFFFFFFFF
    assert all((w0 >> (3 * v)) & 7 == v % 8 for v in range(10))
    assert (w0 >> 30) == (10 % 8) & 3


def test_awq_interleave():
    q = torch.randint(0, 16, (8, 64))
    assert torch.equal(codes.awq_unpack(codes.awq_pack(q), 64), q.int())
    # nibble i of word j holds column 8j + [0, 2, 4, 6, 1, 3, 5, 7][i]
    row = torch.arange(8)[None, :]
    word = int(codes.awq_pack(row)[0, 0])
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


def test_fp4_and_int4_rows_round_trip():
    c = torch.randint(0, 16, (32, 64))
    packed = codes.pack_fp4(c)
    assert packed.shape == (32, 32) and int(packed[0, 0]) == int(c[0, 0]) | (int(c[0, 1]) << 4)
    assert torch.equal(codes.unpack_fp4(packed), c.int())
    s = torch.randint(-8, 8, (32, 64))
    assert torch.equal(codes.unpack_int4_rows(codes.pack_int4_rows(s)), s.to(torch.int8))


def test_small_float_tables():
    assert codes.e2m1_decode(torch.arange(16)).tolist() == [
        0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6
    ]  # fmt: skip
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0])
    assert codes.e2m1_round(ties).tolist() == [0, 1, 1, 2, 2, 4, 4, 6]
    e = codes.e8m0_decode(torch.tensor([127, 128, 0, 255], dtype=torch.uint8))
    assert e[:2].tolist() == [1.0, 2.0] and e[2] == 2.0**-127 and torch.isnan(e[3])
    table = torch.tensor(codes.NF4_VALUES)
    vals = codes.nf4_like_decode(torch.tensor([0x0F, 0x70], dtype=torch.uint8), table)
    assert vals.tolist() == [-1.0, 1.0, table[7].item(), -1.0]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_across_row_chunks(monkeypatch, bits):
    """Rows split into several bounded chunks give the same words and codes as one chunk."""
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (37, 64), generator=gen, dtype=torch.int32)
    packed, unpacked = (
        codes.pack_int32(q, bits, 1),
        codes.unpack_int32(codes.pack_int32(q, bits, 1), bits, 1, 64),
    )
    monkeypatch.setattr(codes, "_CHUNK", 200)  # a few rows a chunk, a ragged last chunk
    assert torch.equal(codes.pack_int32(q, bits, 1), packed)
    assert torch.equal(codes.unpack_int32(packed, bits, 1, 64), unpacked)
    assert torch.equal(unpacked, q)
