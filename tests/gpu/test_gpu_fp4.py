"""The weight-only FP4 GEMM (NVFP4 / MXFP4, both paths) against `reference.fp4_gemm` and an
independent float64 dequantization, on shapes that leave partial tiles and uneven splits."""

# ruff: noqa: E402 - the imports after importorskip need triton, which CI's CPU torch lacks

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")  # CI's CPU torch has none; the module holds a kernel
import triton.language as tl
from gpu_util import (  # noqa: F401
    ACT_DTYPE,
    gpu_device,
    interpreter_scalar_index,
    rel_err,
)

from lowbit.kernels import reference
from lowbit.kernels.codes import e2m1_decode, e8m0_decode, unpack_fp4
from lowbit.kernels.triton.fp4_gemm import _e2m1_f32, _scale_f32, fp4_gemm

pytestmark = pytest.mark.gpu
FMTS = ["nvfp4", "mxfp4"]
GROUP = {"nvfp4": 16, "mxfp4": 32}
# output rounding to bf16 (2^-9) dominates: the dequantized operands are exact in both paths
TOL = 4e-3
# e2m1 values by code, written out (not codes.E2M1_VALUES): the float64 oracle's own table
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M1_F64 = torch.tensor(E2M1 + [-v for v in E2M1], dtype=torch.float64)


def _operands(fmt: str, M: int, N: int, K: int, seed: int):
    """Random codes, block scales (e4m3 subnormals included) and row scales; x; bias."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8)
    G = GROUP[fmt]
    if fmt == "mxfp4":
        bs = torch.randint(120, 131, (N, K // G), generator=gen).to(torch.uint8)
        rs = None
    else:
        bs = (torch.rand(N, K // G, generator=gen) * 2 + 2**-8).to(torch.float8_e4m3fn)
        rs = torch.rand(N, generator=gen) + 0.5
    x = torch.randn(M, K, generator=gen).to(ACT_DTYPE)
    return x, w, bs, rs, torch.randn(N, generator=gen).to(ACT_DTYPE)


def _ref_scale(bs: torch.Tensor, rs: torch.Tensor | None) -> torch.Tensor:
    """float32 (N, K/G) multipliers as FP4Scheme.apply builds them for the reference."""
    if bs.dtype == torch.uint8:
        return e8m0_decode(bs)
    return bs.float() * rs[:, None]


def _dequant64(w, bs, rs, G):
    """Independent float64 dequantization: (N, K)."""
    p = w.long()
    codes = torch.stack([p & 15, p >> 4], dim=-1).reshape(w.shape[0], -1)  # low nibble = even k
    s = 2.0 ** (bs.double() - 127) if bs.dtype == torch.uint8 else bs.double()
    if rs is not None:
        s = s * rs.double()[:, None]
    return E2M1_F64[codes] * s.repeat_interleave(G, dim=1)


def _run(dev, x, w, bs, rs, G, bias=None, config=None, **kw):
    """fp4_gemm on `dev`, result back on the CPU."""
    to = (lambda t: None if t is None else t.to(dev))  # fmt: skip
    y = fp4_gemm(to(x), to(w), to(bs), to(rs), G, to(bias), mx=bs.dtype == torch.uint8,
                 config=config, **kw)  # fmt: skip
    return y.cpu()


@triton.jit
def _decode_all_kernel(words_ptr, bytes_ptr, e2m1_ptr, e4m3_ptr, e8m0_ptr):
    words = tl.load(words_ptr + tl.arange(0, 64))  # (64,) int32 = the 256 bytes
    sh = 28 - 4 * tl.arange(0, 8)
    v = _e2m1_f32(words[:, None], sh[None, :])  # (64, 8)
    tl.store(e2m1_ptr + tl.arange(0, 64)[:, None] * 8 + tl.arange(0, 8)[None, :], v)
    b = tl.load(bytes_ptr + tl.arange(0, 256)).to(tl.int32)
    tl.store(e4m3_ptr + tl.arange(0, 256), _scale_f32(b, False))
    tl.store(e8m0_ptr + tl.arange(0, 256), _scale_f32(b, True))


def test_decoders_exhaustive(dev):
    """Every byte: e2m1 nibble pairs (low nibble first), e4m3 and e8m0 scales, bit-exact
    against torch's decodes (NaN codes included, 2^-127 and e4m3 subnormals included)."""
    raw = torch.arange(256, dtype=torch.uint8)
    outs = [torch.empty(n, dtype=torch.float32, device=dev) for n in (512, 256, 256)]
    _decode_all_kernel[(1,)](raw.view(torch.int32).to(dev), raw.to(dev), *outs)
    e2m1, e4m3, e8m0 = (o.cpu() for o in outs)
    exact = {"rtol": 0, "atol": 0, "equal_nan": True}
    torch.testing.assert_close(e2m1, e2m1_decode(unpack_fp4(raw)), **exact)
    torch.testing.assert_close(e4m3, raw.view(torch.float8_e4m3fn).float(), **exact)
    torch.testing.assert_close(e8m0, e8m0_decode(raw), **exact)


@pytest.mark.parametrize("path", ["mma", "gemv"])
@pytest.mark.parametrize("fmt", FMTS)
def test_identity_exact(dev, fmt, path):
    """x = I reads dequant(W)^T back: every element equals the float64 oracle exactly (all
    256 e4m3 scale bytes but NaN; power-of-two row scales)."""
    N = K = 64
    G = GROUP[fmt]
    gen = torch.Generator().manual_seed(1)
    w = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8)
    if fmt == "mxfp4":  # 2^-15 … 2^9: every product is an fp16 number
        bs = (112 + torch.randperm(N * K // G, generator=gen) % 25).to(torch.uint8)
        bs, rs = bs.reshape(N, K // G), None
    else:
        b = torch.randperm(256, generator=gen)
        b = torch.where(b % 128 == 127, b - 1, b).to(torch.uint8)  # 0x7F / 0xFF are NaN
        bs = b.reshape(N, K // G).view(torch.float8_e4m3fn)
        rs = 2.0 ** torch.randint(-2, 3, (N,), generator=gen).float()
    want = _dequant64(w, bs, rs, G).t().to(ACT_DTYPE)  # (K, N)
    eye = torch.eye(K, dtype=ACT_DTYPE)
    if path == "mma":
        y = _run(dev, eye, w, bs, rs, G, config={"path": "mma", "bm": 32, "bn": 32})
    else:  # M ≤ 2: two rows of the identity a call
        y = torch.cat([_run(dev, eye[i : i + 2], w, bs, rs, G, config={"path": "gemv"})
                       for i in range(0, K, 2)])  # fmt: skip
    assert torch.equal(y, want), (y - want).abs().max()


CASES = [  # path, M, N, K, config
    ("gemv", 1, 200, 224, None),  # one split (bias in the kernel), partial N and K tiles
    ("gemv", 2, 72, 1056, None),  # 5 splits, the last K tile partial; the reduce adds bias
    ("gemv", 1, 72, 1056, {"bn": 8, "bk": 64, "split": 4}),  # a split partly past K
    ("gemv", 2, 48, 512, {"bk": 128, "stages": 2, "split": 1}),  # EVEN: no masks in the loop
    ("mma", 1, 200, 224, None),
    ("mma", 17, 200, 224, None),
    ("mma", 128, 136, 512, None),  # K a multiple of bk
    ("mma", 129, 200, 224, None),
    ("mma", 33, 72, 1056, {"bm": 32, "bn": 32, "bk": 32, "swap": 0, "group_m": 2}),
    ("mma", 17, 200, 1056, {"split": 4}),  # split-K: 17 K tiles in 4 splits, the last partial
    ("mma", 64, 136, 512, {"split": 3}),  # 8 K tiles in 3 splits of 3, 3, 2
]


@pytest.mark.parametrize("path,M,N,K,config", CASES)
@pytest.mark.parametrize("fmt", FMTS)
def test_fp4_gemm(dev, fmt, path, M, N, K, config):
    x, w, bs, rs, bias = _operands(fmt, M, N, K, M + N + K)
    G = GROUP[fmt]
    y = _run(dev, x, w, bs, rs, G, bias, config={"path": path, **(config or {})})
    ref = reference.fp4_gemm(x.float(), w, _ref_scale(bs, rs), G, None, bias.float())
    assert y.shape == (M, N) and y.dtype == ACT_DTYPE
    assert rel_err(y, ref) < TOL


@pytest.mark.parametrize("M", [2, 3])
def test_default_path(dev, M, monkeypatch):
    """Without a config, M ≤ 2 takes the GEMV and larger M the MMA kernel (recorded at the
    launch: the two paths may round a product identically, so their outputs cannot tell)."""
    from lowbit.kernels.triton import fp4_gemm as mod

    taken = []
    for name in ("_gemv", "_mma"):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _n=name, _f=real: taken.append(_n) or _f(*a))
    x, w, bs, rs, _ = _operands("nvfp4", M, 136, 544, 5)
    y = _run(dev, x, w, bs, rs, 16)
    assert taken == (["_gemv"] if M <= 2 else ["_mma"])
    forced = _run(dev, x, w, bs, rs, 16, config={"path": "gemv" if M <= 2 else "mma"})
    assert torch.equal(y, forced)
    if M > 2:
        with pytest.raises(AssertionError, match="small-M path"):
            _run(dev, x, w, bs, rs, 16, config={"path": "gemv"})


@pytest.mark.parametrize("path,M", [("gemv", 2), ("mma", 24)])
def test_nibble_and_group_order(dev, path, M):
    """The result matches the low-nibble-first, k // G scale mapping and is far from a swapped
    nibble order or scales shifted by one group (what a layout slip would compute)."""
    x, w, bs, rs, _ = _operands("nvfp4", M, 96, 320, 11)
    y = _run(dev, x, w, bs, rs, 16, config={"path": path})
    s = _ref_scale(bs, rs)
    ref = reference.fp4_gemm(x.float(), w, s, 16)
    swapped = reference.fp4_gemm(x.float(), (w << 4) | (w >> 4), s, 16)
    shifted = reference.fp4_gemm(x.float(), w, s.roll(1, dims=1), 16)
    assert rel_err(y, ref) < TOL
    assert rel_err(y, swapped) > 0.5 and rel_err(y, shifted) > 0.1


@pytest.mark.parametrize("divisor", [False, True])
@pytest.mark.parametrize("path,M", [("gemv", 1), ("mma", 17)])
def test_w4a4_input_scale(dev, path, M, divisor):
    """NVFP4 W4A4: x goes through the reference's activation simulation first (both scale
    conventions), so the result is the reference's W4A4 product, not the weight-only one."""
    x, w, bs, rs, bias = _operands("nvfp4", M, 72, 256, 21)
    amax = x.float().abs().max()
    gs = (448 * 6 / amax if divisor else amax / (448 * 6)).reshape(1)
    y = _run(dev, x, w, bs, rs, 16, bias, config={"path": path}, input_scale=gs.to(dev),
             divisor=divisor)  # fmt: skip
    s = _ref_scale(bs, rs)
    ref = reference.fp4_gemm(x, w, s, 16, gs, bias, divisor=divisor).float()
    weight_only = reference.fp4_gemm(x.float(), w, s, 16, None, bias.float())
    assert rel_err(y, ref) < TOL
    assert rel_err(y, weight_only) > 0.02  # activation rounding (~10%) is really applied


def test_leading_dims_and_empty(dev):
    """x (..., K) keeps its leading shape; no rows gives an empty (0, N)."""
    x, w, bs, _, _ = _operands("mxfp4", 6, 40, 128, 3)
    y = _run(dev, x.reshape(2, 3, 128), w, bs, None, 32)
    ref = reference.fp4_gemm(x.float(), w, _ref_scale(bs, None), 32)
    assert y.shape == (2, 3, 40) and rel_err(y.reshape(6, 40), ref) < TOL
    assert _run(dev, x[:0], w, bs, None, 32).shape == (0, 40)


def test_bad_config(dev):
    """Unknown paths and keys name what is accepted."""
    x, w, bs, rs, _ = _operands("nvfp4", 1, 32, 64, 0)
    with pytest.raises(ValueError, match="'gemv' or 'mma'"):
        _run(dev, x, w, bs, rs, 16, config={"path": "tiled"})
    with pytest.raises(ValueError, match="unknown fp4 GEMV config keys"):
        _run(dev, x, w, bs, rs, 16, config={"path": "gemv", "block_w": 32})
    with pytest.raises(ValueError, match="unknown fp4 MMA config keys"):
        _run(dev, x, w, bs, rs, 16, config={"path": "mma", "waves": 2})


@pytest.mark.parametrize("path", ["gemv", "mma"])
def test_graph_replay(dev, path):
    """Eager result against the reference; on CUDA, graph replay equals the eager call."""
    x, w, bs, rs, bias = _operands("nvfp4", 2, 1032, 1024, 7)
    args = [t.to(dev) for t in (x, w, bs, rs)] + [16, bias.to(dev)]
    cfg = {"path": path}
    y = fp4_gemm(*args, config=cfg)
    ref = reference.fp4_gemm(x.float(), w, _ref_scale(bs, rs), 16, None, bias.float())
    assert rel_err(y, ref) < TOL
    if dev.type != "cuda":
        return
    static_x = args[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp4_gemm(static_x, *args[1:], config=cfg)
    static_x.copy_(args[0] * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp4_gemm(args[0] * 0.5, *args[1:], config=cfg))


@pytest.mark.parametrize("fused", [True, False])
def test_mma_split_k_finish(dev, monkeypatch, fused):
    """MMA split-K: summed by the tile's last split (fused) or by the reduce launch, the same
    result within fp32 summation order; the arrival counters end at zero."""
    from lowbit.kernels.triton import common

    monkeypatch.setattr(common, "FUSED_SPLITK", fused)
    reduces = []
    real = common.splitk_finish
    monkeypatch.setattr(common, "splitk_finish", lambda *a: reduces.append(1) or real(*a))
    x, w, bs, rs, bias = _operands("nvfp4", 40, 264, 1024, 3)
    ref = reference.fp4_gemm(x.float(), w, _ref_scale(bs, rs), 16, None, bias.float())
    one = _run(dev, x, w, bs, rs, 16, bias, config={"path": "mma", "split": 1})
    assert reduces == []  # unsplit: the kernel writes the result
    split = _run(dev, x, w, bs, rs, 16, bias, config={"path": "mma", "split": 4})
    assert reduces == ([] if fused else [1]), "the split was summed on the wrong path"
    assert rel_err(split, ref) < TOL and rel_err(split, one.double()) < TOL
    assert all(int(c.abs().sum()) == 0 for c in common._COUNTERS.get(str(dev), []))
