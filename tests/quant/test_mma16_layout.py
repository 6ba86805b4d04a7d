"""The `mma16` int4 layout of the small-M tensor-core kernel (kernels/triton/wna16_mma.py):
packing round-trips, and a lane-by-lane emulation of the MMA fragments it feeds gives the
reference product (the kernel itself is GPU-only: tests/gpu/test_gpu_wna16_mma.py)."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels import reference
from lowbit.kernels.mma16 import emulate, pack_mma16, supported, unpack_mma16


def _random_words(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int32)


def test_pack_round_trip_and_moves_every_code():
    qw = _random_words(192, 128 // 8)
    packed = pack_mma16(qw)
    assert packed.shape == (2, 12, 32, 4) and packed.dtype == torch.int32
    assert torch.equal(unpack_mma16(packed), qw)
    assert not torch.equal(packed.reshape(-1), qw.reshape(-1))  # a real reordering


def test_fragment_of_lane_zero():
    """Lane 0 (g = c = 0), column tile 0, step 0: nibble h + 2 kh + 4 kl is W[8 h, 2 kh + kl]
    (the MMA's k column 8 kh + kl is row 2 kh + kl of the block for c = 0, s = 0)."""
    K, N = 64, 64
    codes = torch.arange(K * N).reshape(K, N) % 16  # code of (k, n)
    qw = (codes.reshape(K, N // 8, 8) << (4 * torch.arange(8))).sum(-1)
    qw = (qw - ((qw >> 31) << 32)).to(torch.int32)
    word = int(pack_mma16(qw)[0, 0, 0, 0]) & 0xFFFFFFFF
    for i in range(8):
        h, kh, kl = i % 2, (i // 2) % 2, i // 4
        assert (word >> (4 * i)) & 0xF == codes[2 * kh + kl, 8 * h]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,sym", [(64, False), (128, True), (192, False)])
def test_emulated_fragments_match_reference(G, sym, dtype):
    K, N, M = 192 if G != 128 else 256, 128, 3
    qw = _random_words(K, N // 8, seed=1)
    qz = None if sym else _random_words(K // G, N // 8, seed=2)
    gen = torch.Generator().manual_seed(3)
    s = (torch.rand(K // G, N, generator=gen) * 0.1 + 0.01).to(dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    ref = reference.wna16_gemm(x.double(), qw, s.double(), qz, G, 4, None, None)
    got = emulate(x, pack_mma16(qw), s, qz, G)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()  # the reference sums in fp32


def test_supported_shapes():
    assert supported(4096, 4096, 128, 4)
    assert supported(6144, 4096, -1, 4)
    assert not supported(4096, 4096, 128, 8)  # int8: the GEMV's
    assert not supported(4104, 4096, 128, 4)  # N not a multiple of 64
    assert not supported(4096, 4096, 32, 4)  # groups shorter than a 64-row block
