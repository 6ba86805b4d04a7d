"""Split argmax of greedy sampling (triton/argmax.py) against torch's argmax: first max on ties,
rows of -inf, chunk edges, strided rows; the arrival counters are back at zero after a call."""

from __future__ import annotations

import pytest
import torch
from gpu_util import gpu_device, interpreter_scalar_index  # noqa: F401

pytestmark = pytest.mark.gpu
BLOCK = 4096  # triton/argmax.BLOCK (checked below); Triton is imported inside the tests only


def _argmax(x):
    from lowbit.kernels.triton import argmax as mod

    assert mod.BLOCK == BLOCK
    return mod.argmax(x)


@pytest.mark.parametrize("B,V", [(1, 1), (1, 7), (3, BLOCK), (2, BLOCK + 1), (5, 3 * BLOCK - 5),
                                 (1, 128256), (64, 2 * BLOCK + 17)])  # fmt: skip
def test_argmax_matches_torch(dev, B, V):
    """Random rows, then ties planted: the max repeated in a later chunk and twice inside one
    chunk must give the first position, as torch does; a row of -inf gives 0."""
    gen = torch.Generator().manual_seed(B * 1000 + V)
    x = torch.randn(B, V, generator=gen)
    if V > 3:
        hi = x.max() + 1
        x[0, V - 1] = hi  # a tie across chunks (or inside one when V ≤ BLOCK)
        x[0, V // 2] = hi
        x[-1, 1] = x[-1, 2] = hi  # a tie inside the first chunk
    if B > 2:
        x[1] = -float("inf")
    x = x.to(dev)
    got = _argmax(x)
    assert got.dtype == torch.int64 and got.shape == (B,)
    assert torch.equal(got.cpu(), x.cpu().argmax(-1))
    assert torch.equal(_argmax(x).cpu(), got.cpu())  # the counters were put back


def test_argmax_strided_rows_and_half(dev):
    """Rows of a wider buffer (the decode graph's logits are a view) and 16-bit logits."""
    gen = torch.Generator().manual_seed(1)
    buf = torch.randn(6, 3 * BLOCK, generator=gen).to(dev)
    view = buf[:4, : 2 * BLOCK + 3]
    assert torch.equal(_argmax(view).cpu(), view.cpu().argmax(-1))
    half = buf.half()
    assert torch.equal(_argmax(half).cpu(), half.cpu().float().argmax(-1))


def test_dispatch_argmax_routes_and_falls_back(dev, monkeypatch):
    """dispatch.argmax takes the split kernel where Triton runs, torch's argmax with the switch
    off; both give the same tokens."""
    from lowbit.kernels import dispatch
    from lowbit.kernels.triton import argmax as mod

    calls = []
    real = mod.argmax
    monkeypatch.setattr(mod, "argmax", lambda x: calls.append(x.shape) or real(x))
    monkeypatch.setattr(dispatch, "use_triton", lambda device: True)
    x = torch.randn(2, 5000, generator=torch.Generator().manual_seed(2)).to(dev)
    want = x.cpu().argmax(-1)
    assert torch.equal(dispatch.argmax(x).cpu(), want) and calls == [(2, 5000)]
    monkeypatch.setattr(dispatch, "SPLIT_ARGMAX", False)
    assert torch.equal(dispatch.argmax(x).cpu(), want) and calls == [(2, 5000)]
