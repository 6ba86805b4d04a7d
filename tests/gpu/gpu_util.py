"""GPU-test helpers: the `dev` fixture (CUDA; `LOWBIT_TEST_DEVICE=cpu` with `TRITON_INTERPRET=1`
runs the kernels in Triton's interpreter on a CPU) and float64 oracles for the kernels' layouts.

Not a conftest.py: a second conftest module would shadow tests/conftest.py for `from conftest
import …` in the CPU tests. Test modules import the `dev` fixture (`gpu_device`) from here.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

# Triton's interpreter mishandles bf16 (numpy has none), so interpreted runs use fp16.
ACT_DTYPE = torch.float16 if os.environ.get("TRITON_INTERPRET") == "1" else torch.bfloat16


@pytest.fixture(scope="session", name="dev")
def gpu_device() -> torch.device:
    """Where kernels run; skips when there is no CUDA and no interpreter override."""
    name = os.environ.get("LOWBIT_TEST_DEVICE", "cuda")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device(name)


@pytest.fixture(autouse=True)
def interpreter_scalar_index(monkeypatch):
    """Let Triton 3.6's interpreter use runtime loop bounds under numpy ≥ 2.4.

    The interpreter holds scalars as 1-element arrays and turns them into Python ints with
    int(array), which numpy 2.4 refuses for arrays that are not 0-d, so every kernel with a
    `range` over a runtime value failed when interpreted. Compiled runs are unaffected.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.runtime.interpreter as interp

    patch = interp._patch_lang_tensor

    def patch_with_item(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    monkeypatch.setattr(interp, "_patch_lang_tensor", patch_with_item)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ in float64; NaN anywhere fails."""
    assert not torch.isnan(got).any(), "NaN in kernel output"
    got, ref = got.double().cpu(), ref.double().cpu()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def pack_along_n(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, N) unsigned codes → (R, N // P) int32, value n in bits [bits·(n % P), …)."""
    P = 32 // bits
    R, N = codes.shape
    c = codes.to(torch.int64).reshape(R, N // P, P)
    shifts = torch.arange(P, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # wrap to signed int32


def quantize_wna16(w: torch.Tensor, bits: int, group: int, sym: bool):
    """RTN group-wise quantization of W (N, K) → (qweight, scales, qzeros, dequantized W)."""
    N, K = w.shape
    qmax = (1 << bits) - 1
    wg = w.float().reshape(N, K // group, group)
    if sym:
        scale = wg.abs().amax(-1) / (qmax // 2)
        zero = torch.full_like(scale, 1 << (bits - 1))
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = (hi - lo) / qmax
        zero = (-lo / scale).round().clamp(0, qmax)
    scale = scale.clamp_min(1e-8)
    q = (wg / scale[..., None] + zero[..., None]).round().clamp(0, qmax)
    deq = ((q - zero[..., None]) * scale[..., None]).reshape(N, K)
    qweight = pack_along_n(q.reshape(N, K).t().to(torch.int32), bits)  # (K, N // P)
    qzeros = None if sym else pack_along_n(zero.t().to(torch.int32), bits)  # (K // G, N // P)
    return qweight, scale.t().contiguous(), qzeros, deq


def paged_attention_oracle(q, k_cache, v_cache, tables, seq_lens, query_lens, block_size,
                           k_scale=1.0, v_scale=1.0):  # fmt: skip
    """float64 causal attention of each sequence's new queries over its cached context."""
    T, H, D = q.shape
    Hkv = k_cache.shape[1]
    out = torch.zeros(T, H, D, dtype=torch.float64)
    row = 0
    for b, (L, n) in enumerate(zip(seq_lens, query_lens)):
        idx = torch.arange(L)
        slots = tables[b, idx // block_size].long().cpu() * block_size + idx % block_size
        k = k_cache.cpu()[slots].double().repeat_interleave(H // Hkv, 1) * k_scale  # (L, H, D)
        v = v_cache.cpu()[slots].double().repeat_interleave(H // Hkv, 1) * v_scale
        qs = q[row : row + n].cpu().double()  # (n, H, D)
        s = torch.einsum("nhd,lhd->hnl", qs, k) / math.sqrt(D)
        pos = L - n + torch.arange(n)
        s = s.masked_fill(idx[None, None, :] > pos[None, :, None], float("-inf"))
        out[row : row + n] = torch.einsum("hnl,lhd->nhd", s.softmax(-1), v)
        row += n
    return out
