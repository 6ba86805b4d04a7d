"""The one place that picks a kernel: Triton / torch built-ins on CUDA, the reference elsewhere.

Every op here has the signature of its reference in `lowbit.kernels.reference` (the CPU path and
the tests' oracle) or, where a kernel fuses several (`rms_norm` and `silu_mul` with `quant`) or
reads a stored layout the reference does not (`fp4_gemm`), builds its CPU result from them;
schemes and layers call these and never branch on the device themselves.
Triton is imported lazily, so CPU-only installs never need it. `LOWBIT_DISABLE_TRITON=1` forces
the reference path everywhere (for bisecting a numerical difference).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch
from torch import Tensor

from lowbit.kernels import mma16
from lowbit.kernels.codes import e8m0_decode


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports here."""
    if os.environ.get("LOWBIT_DISABLE_TRITON") == "1":
        return False
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def use_triton(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices when Triton is installed (anywhere under its
    interpreter, `TRITON_INTERPRET=1`, which is how the kernels are debugged without a GPU)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return triton_available()
    return device.type == "cuda" and triton_available()


@functools.cache
def capability(index: int = 0) -> tuple[int, int]:
    """Compute capability of a CUDA device, (0, 0) without CUDA."""
    if not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability(index)


# Up to this many tokens FP8 W8A8 takes the split-K Triton W8A8 kernel instead of cuBLAS.
# Verified on the H100 (`pytest -m gpu -k w8a8_triton_fp8`, 2026-11-27); measured there it is
# 1.15-1.48x bf16 at M <= 16 where cuBLAS FP8 is 0.97-1.09x, except gate_up (both 1.6x).
# Not measured above 16, so cuBLAS keeps M > 16 (benchmarks/RESULTS.md).
FP8_TRITON_MAX_M = 16


def fp8_mma_supported(device: torch.device) -> bool:
    """FP8 tensor-core GEMMs need Ada or Hopper (sm_89+)."""
    return device.type == "cuda" and capability(device.index or 0) >= (8, 9)


def _triton(module: str, name: str):
    """A wrapper from lowbit.kernels.triton.<module>, imported on first use."""
    return getattr(importlib.import_module(f"lowbit.kernels.triton.{module}"), name)


def _reference(name: str):
    """The pure-torch reference op `name`."""
    ref = importlib.import_module("lowbit.kernels.reference")
    if not hasattr(ref, name):
        raise NotImplementedError(f"lowbit.kernels.reference has no {name!r} yet")
    return getattr(ref, name)


# ---- unquantized ----

# Up to this many rows bf16/fp16 linears take the Triton GEMV (`triton/w8a8_gemv.gemv16`, PDL
# launches) instead of cuBLAS; 0 turns it off. H100, run 8: 1.0-1.1x cuBLAS on every Llama-3-8B
# linear and the lm_head at M = 1; bf16 batch-1 decode 161 → 166 tok/s (before its final config).
GEMV16_MAX_M = 1


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight^T (+ bias) for a full-precision weight (N, K): F.linear, or the Triton GEMV
    for up to GEMV16_MAX_M rows of bf16/fp16 on CUDA."""
    M = x.numel() // x.shape[-1]
    if (
        0 < M <= GEMV16_MAX_M
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.stride(-1) == 1
        and use_triton(x.device)
    ):
        y = _triton("w8a8_gemv", "gemv16")(x.reshape(M, -1).contiguous(), weight, bias)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return _reference("linear")(x, weight, bias)


# ---- weight-only int4 / int8 ----

# Up to this many rows W4A16/W8A16 takes the CUDA-core GEMV (one FFMA per weight per row);
# above it the tensor-core kernel wins: on the H100 the GEMV is 0.97-1.77x bf16 at M = 1 and
# 0.86-1.61x at M = 2, but 0.3x at M = 4 (benchmarks/RESULTS.md).
WNA16_GEMV_MAX_M = 2
# int4 weights with at least WNA16_TILED_MIN_TILES 128-column tiles (gate_up_proj of an 8B: 224)
# take the tiled kernel (triton/wna16_tiled.py) for M in [64, 256], one row tile of
# next_pow2(M) rows: H100, run 6 — gate_up 184 → 89 µs at M = 64 and 404 → 194 µs at M = 256
# (1.04× / 0.55× bf16). Weights with fewer tiles (qkv, o, down) and M = 1024 were faster on
# the existing paths (the tiled kernel has no split-K, and at large M dequant + cuBLAS wins).
WNA16_TILED_M = (64, 256)
WNA16_TILED_MIN_TILES = 128


def _wna16_op(M: int, N: int, bits: int) -> tuple[str, str, dict | None]:
    """(module, function, config) of the Triton W4A16/W8A16 path for this shape."""
    if M <= WNA16_GEMV_MAX_M:
        return "wna16_gemv", "wna16_gemv", None
    lo, hi = WNA16_TILED_M
    if bits == 4 and lo <= M <= hi and -(-N // 128) >= WNA16_TILED_MIN_TILES:
        bm = 1 << (M - 1).bit_length()  # next power of two ≥ M: one row tile
        return "wna16_tiled", "wna16_gemm_tiled", {"bm": bm}
    return "wna16_gemm", "wna16_gemm", None


def wna16_gemm(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    qzeros: Tensor | None,
    group_size: int,
    bits: int = 4,
    bias: Tensor | None = None,
    perm: Tensor | None = None,
) -> Tensor:
    """x @ dequant(W)^T for a group-wise integer weight. In the canonical packed layout (see
    triton/wna16_gemm.py) up to WNA16_GEMV_MAX_M rows take the split-K CUDA-core GEMV
    (triton/wna16_gemv.py), wide int4 weights at medium M the tiled kernel
    (triton/wna16_tiled.py); int4 loaded in the `mma16` layout (a 4-D qweight, see
    `wna16_mma_layout`) takes its tensor-core kernel (`_wna16_mma`)."""
    if qweight.dim() == 4:
        return _wna16_mma(x, qweight, scales, qzeros, group_size, bias, perm)
    if use_triton(x.device) and x.dtype in (torch.float16, torch.bfloat16):
        module, name, config = _wna16_op(x.numel() // x.shape[-1], scales.shape[-1], bits)
        args = (x, qweight, scales, qzeros, group_size, bits, bias, perm)
        return _triton(module, name)(*args, **({"config": config} if config else {}))
    return _reference("wna16_gemm")(x, qweight, scales, qzeros, group_size, bits, bias, perm)


# Int4 weights on CUDA (sm_80+) are stored in the `mma16` layout of kernels/mma16.py when
# their shape allows (N % 64, K % 64, groups of a multiple of 64 rows): up to WNA16_MMA_MAX_M
# rows run the tensor-core kernel on it, more rows dequantize once and take cuBLAS.
# LOWBIT_WNA16_MMA=0 keeps the canonical layout and its kernels (an A/B switch).
WNA16_MMA = os.environ.get("LOWBIT_WNA16_MMA", "1") != "0"
WNA16_MMA_MAX_M = 64
# Wide weights (gate_up) at 33-64 rows take the tiled tensor-core kernel on the same layout
# (triton/wna16_mma_tiled.py, its default config; groups of a multiple of 128 rows) instead:
# H100, benchmarks/RESULTS.md run 12 — gate_up at M = 64 123 → 95 µs (bf16 cuBLAS 93). It lost
# to the small-M kernel on qkv / o / down at M ≤ 64 and at M = 16, and to dequantize + cuBLAS
# at M = 256, so it runs nowhere else. LOWBIT_WNA16_MMA_TILED=0 turns it off (an A/B switch).
WNA16_MMA_TILED = os.environ.get("LOWBIT_WNA16_MMA_TILED", "1") != "0"
WNA16_MMA_TILED_MIN_M = 33  # up to WNA16_MMA_MAX_M
WNA16_MMA_TILED_MIN_N = 16384


def wna16_mma_layout(device: torch.device, N: int, K: int, group_size: int, bits: int) -> bool:
    """Whether an int4 weight of this shape is stored in the `mma16` layout on `device`."""
    if not (WNA16_MMA and use_triton(device) and capability(device.index or 0) >= (8, 0)):
        return False
    return mma16.supported(N, K, group_size, bits)


def _wna16_mma(x, qmma, scales, qzeros, group_size, bias, perm) -> Tensor:
    """`wna16_gemm` over the `mma16` layout: the small-M tensor-core kernel up to
    WNA16_MMA_MAX_M rows of bf16/fp16 (the tiled one for wide weights from WNA16_MMA_TILED_MIN_M
    rows), else the weight dequantized (triton/wna16_mma.dequant_mma16) and one dense GEMM;
    off CUDA (a model moved after loading) the reference over the unpacked codes."""
    if not use_triton(x.device):
        q = mma16.unpack_mma16(qmma)
        return _reference("wna16_gemm")(x, q, scales, qzeros, group_size, 4, bias, perm)
    M = x.numel() // x.shape[-1]
    half = x.dtype in (torch.float16, torch.bfloat16) and x.dtype == scales.dtype
    N, K = scales.shape[1], x.shape[-1]
    G = K if group_size in (-1, 0) else group_size
    wide = N >= WNA16_MMA_TILED_MIN_N and G % 128 == 0
    if WNA16_MMA_TILED and half and WNA16_MMA_TILED_MIN_M <= M <= WNA16_MMA_MAX_M and wide:
        return _triton("wna16_mma_tiled", "wna16_mma_tiled")(
            x, qmma, scales, qzeros, group_size, bias, perm
        )
    if M <= WNA16_MMA_MAX_M and half:
        return _triton("wna16_mma", "wna16_mma_gemm")(
            x, qmma, scales, qzeros, group_size, bias, perm
        )
    w = _triton("wna16_mma", "dequant_mma16")(qmma, scales, qzeros, group_size)
    if perm is not None:
        x = x[..., perm]
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


# ---- FP4 (NVFP4 / MXFP4) weights ----


def fp4_gemm(
    x: Tensor,
    weight: Tensor,
    block_scale: Tensor,
    row_scale: Tensor | None,
    group_size: int,
    bias: Tensor | None = None,
    mx: bool = False,
    input_scale: Tensor | None = None,
    divisor: bool = False,
) -> Tensor:
    """x @ dequant(W)^T for e2m1 weights (N, K/2) uint8 with block scales as stored (fp8 e4m3,
    or uint8 e8m0 when `mx`) and an optional per-row multiplier; NVFP4 activations are
    simulated first when `input_scale` is given. Triton (`triton/fp4_gemm.py`: codes decoded
    in registers, bf16/fp16 MMA or a CUDA-core GEMV) for bf16/fp16 x on CUDA, else the
    reference with float32 block scales."""
    if use_triton(x.device) and x.dtype in (torch.float16, torch.bfloat16):
        return _triton("fp4_gemm", "fp4_gemm")(
            x, weight, block_scale, row_scale, group_size, bias, mx,
            input_scale=input_scale, divisor=divisor,
        )  # fmt: skip
    bs = e8m0_decode(block_scale) if mx else block_scale.float()
    if row_scale is not None:
        bs = bs * row_scale[:, None]
    return _reference("fp4_gemm")(x, weight, bs, group_size, input_scale, bias, divisor=divisor)


# ---- FP8 W8A8 ----


class QuantizedActivation:
    """Activations the producing kernel already quantized per token (RMSNorm or SwiGLU with a
    quantized output, `rms_norm` / `silu_mul` with `quant`): codes q (…, K) in the GEMM's
    8-bit dtype and float32 scales (…, 1). A W8A8 GEMM with dynamic per-token inputs takes them
    instead of quantizing again; `dtype` is the unquantized activations' (the GEMM's output)."""

    __slots__ = ("q", "scale", "dtype")

    def __init__(self, q: Tensor, scale: Tensor, dtype: torch.dtype):
        self.q, self.scale, self.dtype = q, scale, dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    def numel(self) -> int:
        return self.q.numel()

    def rows(self) -> tuple[Tensor, Tensor]:
        """(M, K) codes and (M, 1) scales."""
        K = self.q.shape[-1]
        return self.q.reshape(-1, K), self.scale.reshape(-1, 1)


class DeferredQuant(QuantizedActivation):
    """A QuantizedActivation whose codes are not written yet: x (…, K) in the compute dtype
    and, per row, the producer's partial absmaxes `amax` (M, P) float32 (one a SwiGLU program),
    for the per-token scale max(amax, EPS) / qmax. The W8A8 GEMV quantizes x as it loads it,
    with the numbers `act_quant` gives, so SwiGLU at one row runs on many programs instead of
    one that also quantizes the whole row (`silu_mul`). Any other consumer reads `q` / `scale`,
    which quantize x then (the same codes)."""

    __slots__ = ("x", "amax", "qdtype", "qmax", "_codes")

    def __init__(self, x: Tensor, amax: Tensor, qdtype: torch.dtype, qmax: float):
        self.x, self.amax, self.qdtype, self.qmax = x, amax, qdtype, qmax
        self._codes = None

    def _materialize(self) -> tuple[Tensor, Tensor]:
        """The codes and scales, quantized on first use (then kept)."""
        if self._codes is None:
            K = self.x.shape[-1]
            q, s = act_quant(self.x.reshape(-1, K), self.qdtype, None, self.qmax)
            self._codes = (q.reshape(self.x.shape), s.reshape(*self.x.shape[:-1], 1))
        return self._codes

    q = property(lambda self: self._materialize()[0])
    scale = property(lambda self: self._materialize()[1])
    dtype = property(lambda self: self.x.dtype)
    shape = property(lambda self: self.x.shape)
    device = property(lambda self: self.x.device)

    def numel(self) -> int:
        """Elements of x."""
        return self.x.numel()


# Norms and SwiGLU quantize their outputs for W8A8 consumers (LOWBIT_FUSE_ACT_QUANT=0: the
# GEMMs quantize, one more launch each; benchmarks flip FUSE_ACT_QUANT).
FUSE_ACT_QUANT = os.environ.get("LOWBIT_FUSE_ACT_QUANT", "1") != "0"


def fuses_act_quant(device: torch.device, qdtype: torch.dtype) -> bool:
    """Whether norms and SwiGLU quantize their outputs to `qdtype` for a W8A8 consumer here:
    with the Triton kernels, and for fp8 only where the GEMM is an FP8 one (sm_89+; Triton has
    no e4m3 conversion below, and the reference GEMM quantizes by itself). Elsewhere the GEMM
    quantizes, with the same numbers."""
    if not (FUSE_ACT_QUANT and use_triton(device)):
        return False
    return qdtype == torch.int8 or fp8_mma_supported(device)


def _quantized(y: Tensor, qdtype: torch.dtype, qmax: float) -> QuantizedActivation:
    """The reference's per-token quantization of y as a QuantizedActivation."""
    K = y.shape[-1]
    q, s = _reference("act_quant")(y.reshape(-1, K), qdtype, None, qmax)
    return QuantizedActivation(q.reshape(y.shape), s.reshape(*y.shape[:-1], 1), y.dtype)


def act_quant(
    x: Tensor, dtype: torch.dtype, group_size: int | None = None, qmax: float | None = None
):
    """Dynamic symmetric per-token (or per token-group) quantization → (codes, float32 scales)."""
    if use_triton(x.device):
        return _triton("act_quant", "act_quant")(x, dtype, group_size, qmax)
    return _reference("act_quant")(x, dtype, group_size, qmax)


def fp8_scaled_mm(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    input_scale: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """FP8 W8A8 with a per-tensor or per-channel weight scale.

    x (…, K) bf16/fp16; weight (N, K) float8_e4m3fn; weight_scale () / (1,) or (N,) / (N, 1)
    float32; input_scale None → dynamic per-token activations, else a static per-tensor scale.
    """
    if not fp8_mma_supported(x.device):
        if isinstance(x, QuantizedActivation):  # the reference would quantize again
            return _reference("w8a8_codes_gemm")(x.q, x.scale, weight, weight_scale, bias, x.dtype)
        return _reference("fp8_scaled_mm")(x, weight, weight_scale, input_scale, bias)
    N, K = weight.shape
    small = x.numel() // K <= FP8_TRITON_MAX_M
    if use_triton(x.device) and (small or N % 16 or K % 16):  # cuBLASLt FP8: N, K % 16 == 0
        return _triton("w8a8_gemm", "w8a8_gemm")(x, weight, weight_scale, input_scale, bias)
    return _fp8_cublas(x, weight, weight_scale, input_scale, bias)


def _fp8_cublas(x, weight, weight_scale, input_scale=None, bias=None) -> Tensor:
    """FP8 W8A8 through torch._scaled_mm (cuBLASLt), per-tensor or row-wise scales."""
    N, K = weight.shape
    lead = x.shape[:-1]
    if isinstance(x, QuantizedActivation):
        xq, xs = x.rows()
    elif input_scale is None:
        xq, xs = act_quant(x.reshape(-1, K).contiguous(), torch.float8_e4m3fn)
    else:
        xs = input_scale.reshape(1, 1).float()
        xq = (x.reshape(-1, K).float() / xs).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    M = xq.shape[0]  # xq (M, K), xs (M, 1) or (1, 1)
    ws = weight_scale.float()
    if ws.numel() == 1:
        ws = ws.reshape(1, 1)
        if xs.numel() > 1:  # row-wise activations need a row-wise weight scale
            ws = ws.expand(1, N).contiguous()
    else:
        ws = ws.reshape(1, N)
        if xs.numel() == 1:
            xs = xs.expand(M, 1).contiguous()
    out_dtype = x.dtype if ws.numel() == 1 else torch.bfloat16  # row-wise cuBLAS: bf16 out
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=ws, out_dtype=out_dtype)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, N)


def fp8_block_gemm(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    block_size: tuple[int, int] = (128, 128),
    bias: Tensor | None = None,
) -> Tensor:
    """FP8 W8A8 with 128×128 block weight scales and 1×128 dynamic activation groups."""
    if use_triton(x.device) and fp8_mma_supported(x.device):
        return _triton("fp8_block_gemm", "fp8_block_gemm")(
            x, weight, weight_scale, block_size, bias
        )
    return _reference("fp8_block_gemm")(x, weight, weight_scale, block_size, bias)


# ---- INT8 W8A8 ----


def int8_gemm(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    input_scale: Tensor | None = None,
    bias: Tensor | None = None,
    qmax: float | None = None,
) -> Tensor:
    """INT8 W8A8: per-channel int8 weight, per-token dynamic (or static) int8 activations."""
    if use_triton(x.device):
        return _triton("w8a8_gemm", "w8a8_gemm")(x, weight, weight_scale, input_scale, bias, qmax)
    if isinstance(x, QuantizedActivation):  # the reference would quantize again
        return _reference("w8a8_codes_gemm")(x.q, x.scale, weight, weight_scale, bias, x.dtype)
    return _reference("int8_gemm")(x, weight, weight_scale, input_scale, bias, qmax)


# ---- fused elementwise (decode-path launch count) ----


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None, quant=None):
    """RMSNorm (with the residual add fused when `residual` is given). `quant` is a W8A8
    consumer's (dtype, qmax) (`Linear.input_quant`): where `fuses_act_quant`, the output is
    quantized per token in the same kernel and comes as a QuantizedActivation."""
    if quant is not None and not fuses_act_quant(x.device, quant[0]):
        quant = None
    if use_triton(x.device):
        return _triton("rms_norm", "rms_norm")(x, weight, eps, residual, quant=quant)
    out = _reference("rms_norm")(x, weight, eps, residual)
    if quant is None:
        return out
    if residual is None:
        return _quantized(out, *quant)
    return _quantized(out[0], *quant), out[1]


def rotary(positions: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor):
    """Rotate-half rotary embedding of q and k from (P, D/2) cos/sin tables."""
    if use_triton(q.device):
        return _triton("rotary", "rotary")(positions, q, k, cos, sin)
    return _reference("rotary")(positions, q, k, cos, sin)


def silu_mul(x: Tensor, quant=None):
    """[gate | up] (…, 2I) → silu(gate) · up (…, I); `quant` as in `rms_norm`."""
    if quant is not None and not fuses_act_quant(x.device, quant[0]):
        quant = None
    if use_triton(x.device):
        return _triton("silu_mul", "silu_mul")(x, quant=quant)
    out = _reference("silu_mul")(x)
    return out if quant is None else _quantized(out, *quant)


# ---- sampling ----


# Greedy's argmax split across programs (LOWBIT_SPLIT_ARGMAX=0: torch's, an A/B switch).
SPLIT_ARGMAX = os.environ.get("LOWBIT_SPLIT_ARGMAX", "1") != "0"


def argmax(logits: Tensor) -> Tensor:
    """(B, V) float logits → (B,) int64 index of each row's first max (greedy sampling): split
    across programs with Triton (triton/argmax.py), else torch's argmax."""
    if SPLIT_ARGMAX and use_triton(logits.device) and logits.dim() == 2 and logits.stride(-1) == 1:
        out = _triton("argmax", "argmax")(logits)
        if out is not None:
            return out
    return logits.argmax(-1)


# ---- paged attention (callers check `use_triton` and keep their torch path otherwise) ----


def rotary_kv_store(
    positions, q, k, v, cos, sin, k_cache, v_cache, slots, k_scale=1.0, v_scale=1.0
) -> Tensor:
    """`rotary` of q and k, and the rotated k and v written at their cache slots (slot < 0:
    skipped; fp8 as x / scale, saturated) in one launch: the rotated q."""
    return _triton("rotary", "rotary_kv_store")(
        positions, q, k, v, cos, sin, k_cache, v_cache, slots, k_scale, v_scale
    )


def paged_decode_attention(
    q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, k_scale=1.0, v_scale=1.0,
    num_splits=None,
) -> Tensor:  # fmt: skip
    """One query token per sequence over its paged cache (CUDA-graph safe)."""
    return _triton("paged_decode_attention", "paged_decode_attention")(
        q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, k_scale, v_scale,
        num_splits,
    )  # fmt: skip


def paged_prefill_attention(
    q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len, block_size, scale,
    k_scale=1.0, v_scale=1.0,
) -> Tensor:  # fmt: skip
    """Causal attention of variable-length query runs over paged caches with cached prefixes."""
    return _triton("paged_prefill_attention", "paged_prefill_attention")(
        q, k_cache, v_cache, block_tables, seq_lens, query_start, max_query_len, block_size,
        scale, k_scale, v_scale,
    )  # fmt: skip
