"""Fused RMSNorm(+residual), rotary and SiLU·mul against the reference ops (the CPU path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_util import ACT_DTYPE, gpu_device, rel_err  # noqa: F401

from lowbit.kernels import dispatch, reference
from lowbit.layers.norm import RMSNorm
from lowbit.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("T", [1, 17, 129])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dev, T, with_residual):
    """RMSNorm.forward (now the fused kernel) == the reference, with and without the residual."""
    gen = torch.Generator().manual_seed(T)
    N = 4000  # not a power of two
    norm = RMSNorm(N, 1e-5, ACT_DTYPE).to(dev)
    norm.weight.data.copy_(torch.randn(N, generator=gen))
    x = torch.randn(T, N, generator=gen).to(dev, ACT_DTYPE)
    r = torch.randn(T, N, generator=gen).to(dev, ACT_DTYPE) if with_residual else None
    got = norm(x, r)
    ref = reference.rms_norm(x, norm.weight, norm.eps, r)
    if with_residual:
        assert rel_err(got[0], ref[0]) < 1e-2 and torch.equal(got[1], ref[1])
    else:
        assert rel_err(got, ref) < 1e-2


@pytest.mark.parametrize("T", [1, 17, 129])
def test_rotary(dev, T):
    """RotaryEmbedding.forward (llama3 scaling, fused kernel) == the reference op."""
    gen = torch.Generator().manual_seed(T)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    rope = RotaryEmbedding(128, 512, 500000.0, scaling).to(dev)
    pos = torch.randint(0, 512, (T,), generator=gen).to(dev)
    qkv = torch.randn(T, 12 * 128, generator=gen).to(dev, ACT_DTYPE)
    q = qkv[:, : 8 * 128].view(T, 8, 128)  # strided views, as the model passes them
    k = qkv[:, 8 * 128 : 10 * 128].view(T, 2, 128)
    gq, gk = rope(pos, q, k)
    rq, rk = reference.rotary(pos, q, k, rope.cos, rope.sin)
    assert rel_err(gq, rq) < 1e-2 and rel_err(gk, rk) < 1e-2


@pytest.mark.parametrize("T", [1, 17, 129])
def test_silu_mul(dev, T):
    """silu(gate) · up from a fused [gate | up] row."""
    x = torch.randn(T, 2 * 1500, device=dev, dtype=ACT_DTYPE)
    gate, up = x.chunk(2, dim=-1)
    assert rel_err(dispatch.silu_mul(x), F.silu(gate) * up) < 1e-2
