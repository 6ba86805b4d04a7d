"""The in-kernel split-K finish (`common.splitk_last`): the last program of each tile sums the
partials, so a split GEMV is one launch. Checked against the two-launch path it replaces
(`common.splitk_finish`) and a float64 reference; the arrival counters must be back at zero
after every call (else the next call would finish early with partial sums)."""

from __future__ import annotations

import pytest
import torch
from gpu_util import (  # noqa: F401
    ACT_DTYPE,
    gpu_device,
    interpreter_scalar_index,
    quantize_wna16,
    rel_err,
)

pytestmark = pytest.mark.gpu


@pytest.fixture
def common():
    from lowbit.kernels.triton import common

    return common


def _launches(monkeypatch, common) -> list[int]:
    """Record the reduce launches of the two-launch path (the fused one makes none)."""
    calls = []
    real = common.splitk_finish

    def spy(out, bias, dtype):
        calls.append(out.shape[0])
        return real(out, bias, dtype)

    monkeypatch.setattr(common, "splitk_finish", spy)
    return calls


def _counters_zero(common, dev) -> bool:
    return all(int(b.abs().sum()) == 0 for b in common._COUNTERS.get(str(dev), []))


def _wna16(dev, M, N, K, bias_on, seed=0):
    from lowbit.kernels.triton.wna16_gemv import wna16_gemv

    gen = torch.Generator().manual_seed(seed)
    qw, s, z, deq = quantize_wna16(torch.randn(N, K, generator=gen), 4, 128, False)
    x = torch.randn(M, K, generator=gen)
    b = torch.randn(N, generator=gen) if bias_on else None
    ref = x.double() @ deq.double().t() + (b.double() if bias_on else 0)
    args = (x.to(dev, ACT_DTYPE), qw.to(dev), s.to(dev, ACT_DTYPE), z.to(dev), 128, 4,
            b.to(dev, ACT_DTYPE) if bias_on else None)  # fmt: skip
    cfg = {"block_w": 32, "block_k": 16, "chunk": 32, "waves": 10**6}  # many splits
    return (lambda: wna16_gemv(*args, config=cfg)), ref


def _w8a8(dev, M, N, K, bias_on, seed=0):
    from lowbit.kernels.triton.w8a8_gemv import w8a8_gemv

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    ws = w.abs().amax(1) / 127
    wq = (w / ws[:, None]).round().clamp(-127, 127).to(torch.int8)
    xq = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    xs = torch.rand(M, 1, generator=gen) / 100
    b = torch.randn(N, generator=gen) if bias_on else None
    ref = (xq.double() * xs.double()) @ (wq.double() * ws.double()[:, None]).t()
    ref = ref + (b.double() if bias_on else 0)
    args = (xq.to(dev), xs.to(dev), wq.to(dev), ws.to(dev),
            b.to(dev, ACT_DTYPE) if bias_on else None, ACT_DTYPE)  # fmt: skip
    return (lambda: w8a8_gemv(*args, config={"bn": 8, "bk": 64, "waves": 16})), ref


@pytest.mark.parametrize("kernel", [_wna16, _w8a8])
@pytest.mark.parametrize("M,N,K,bias_on", [(1, 136, 512, True), (2, 1032, 1024, False),
                                           (3, 72, 256, True)])  # fmt: skip
def test_fused_finish_matches_two_launch(dev, monkeypatch, common, kernel, M, N, K, bias_on):
    if kernel is _w8a8 and M > 2:
        pytest.skip("the W8A8 GEMV takes M ≤ 2")
    run, ref = kernel(dev, M, N, K, bias_on)
    launches = _launches(monkeypatch, common)
    fused = [run() for _ in range(3)]  # the counters must reset between calls
    assert launches == [], "the fused path launched the separate reduce"
    assert _counters_zero(common, dev)
    monkeypatch.setattr(common, "FUSED_SPLITK", False)
    two = run()
    assert launches and launches[0] > 1, "the check needs a split launch"
    for y in fused:
        assert y.shape == (M, N) and torch.equal(y, fused[0])  # deterministic
        assert rel_err(y, ref) < 1e-2
        # same fp32 partials summed in another order: equal within bf16 rounding
        assert rel_err(y, two.double()) < 4e-3


def test_capture_without_counters_takes_two_launch_path(dev, monkeypatch, common):
    """Counters cannot be allocated inside CUDA-graph capture: the first split GEMV captured
    on a device without them takes the reduce launch, and its replay is still right."""
    if dev.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    run, ref = _wna16(dev, 1, 520, 1024, True)
    monkeypatch.setattr(common, "_COUNTERS", {})
    launches = _launches(monkeypatch, common)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = run()
    assert launches, "capture took the fused path without counters"
    assert common._COUNTERS.get(str(dev), []) == []
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, ref) < 1e-2
    eager = run()  # allocates the counters: the fused path
    assert len(launches) == 1 and _counters_zero(common, dev)
    assert rel_err(eager, out.double()) < 4e-3
