"""Per-layer K/V scales of an fp8 KV cache: the checkpoint's, else calibrated once at start-up.

Convention (every producer's `k_scale`/`v_scale`, SGLang, vLLM): the cache stores `x / scale` in
fp8, saturated to the format's largest finite value, and reads `stored · scale`.

Without checkpoint scales SGLang and vLLM use 1.0. lowbit calibrates instead, once, before the KV
cache is allocated and before CUDA graphs are captured (the Triton kernels take the scales as
Python floats, so a captured graph holds the values it was captured with; they never change
afterwards): the runner's first prefill is a prefill of `CALIBRATION_TEXT` on a scratch cache in
the compute dtype, and each layer gets

    scale = max(1.0, HEADROOM · amax / fp8_max)        (amax = max |k| or |v| of that layer)

Why this rule, measured on the demo model (bf16; 9 sequences: the fp8 test's text plus eight
1000-token held-out stdlib chunks; KL(bf16 cache ‖ fp8 cache) and top-1 agreement):

- fp8 is floating point, so a per-tensor scale only slides the window of exponents: it changes
  nothing for values in the normal range, only saturation at the top and subnormals at the bottom.
  The demo model's |k| ≤ 15 and |v| ≤ 8.3 sit well inside e4m3's ±448. Scale 1.0: e4m3 top-1
  0.963, KL 0.00347; e5m2 0.934, 0.0126. amax/448 scales with no floor (×1, ×2, ×4 headroom;
  amax from other stdlib text, from all nine sequences, or from each sequence itself) barely move
  them: e4m3 top-1 0.960–0.966, KL 0.00323–0.00348; e5m2 KL 0.0115–0.0121. A scale below 1.0 is
  therefore not worth its risk: a later prompt larger than the calibration text would saturate.
- Where K or V exceed the range, scale 1.0 fails. The demo model with k_proj and v_proj ×64
  (q_proj and o_proj ÷64: bf16 logits unchanged; |k| up to ~950) at scale 1.0 saturates: e4m3
  top-1 0.892, KL 0.0381. With this rule (scales 1.5–4.0): top-1 0.963, KL 0.0033, the unscaled
  model's numbers. e5m2 (±57344) is unaffected either way.
- Hence the floor of 1.0 (ModelOpt's TensorRT-LLM export clamps its KV scales to ≥ 1.0 the same
  way; its Hugging Face export writes amax/448 unclamped) and 2× headroom above the calibration
  amax, so prompts up to twice as large still fit unsaturated.
  With no outliers the result is exactly scale 1.0; the rule never does worse than 1.0 on values
  within ±fp8_max.

Why a fixed text and not the first user request: numerics must not depend on which request
happened to arrive first, a first request may be a few tokens long, and CUDA graphs are captured
before any request arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lowbit.layers.attention import Attention

logger = logging.getLogger(__name__)

HEADROOM = 2.0
# Prose and code, so both kinds of token reach every layer; BOS comes from the tokenizer.
CALIBRATION_TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels; then came stored programs, assemblers, and compilers that let people "
    "write for the problem rather than the machine. Today a single sentence can ask a model to "
    "summarise a report, translate a letter, or explain why the sky is blue (Rayleigh "
    "scattering: shorter wavelengths scatter more, roughly as 1/λ⁴).\n\n"
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"
    '    """Merge two sorted lists into one sorted list."""\n'
    "    out, i, j = [], 0, 0\n"
    "    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n"
    "            out.append(a[i]); i += 1\n"
    "        else:\n"
    "            out.append(b[j]); j += 1\n"
    "    return out + a[i:] + b[j:]\n\n"
    "Q: What is 17 × 23?\nA: 391.\n"
    "Q: Name three prime numbers greater than 100.\nA: 101, 103 and 107.\n\n"
    '{"id": 42, "name": "Ada Lovelace", "born": 1815, "tags": ["math", "engines"]}\n'
    "SELECT name, COUNT(*) FROM orders WHERE total > 100.0 GROUP BY name ORDER BY 2 DESC;\n"
    "Bonjour, comment allez-vous ? Muy bien, gracias. Wie spät ist es? 今日は良い天気です。\n"
)
CALIBRATION_MAX_TOKENS = 512


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def calibrated_scale(amax: float, dtype: torch.dtype) -> float:
    """Scale for a layer whose calibration |x| reached `amax`: max(1, HEADROOM·amax/fp8_max)."""
    return max(1.0, HEADROOM * amax / fp8_max(dtype))


@contextmanager
def kv_amax(model: nn.Module) -> Iterator[dict[int, Tensor]]:
    """Record max |k| and |v| per layer (layer id → (2,) float32 tensor) over forwards inside."""
    amax: dict[int, Tensor] = {}

    def hook(module: Attention, args) -> None:
        _, k, v = args[:3]  # (T, Hkv, D) each, after rotary: what the cache stores
        seen = torch.stack([k.abs().amax(), v.abs().amax()]).float()
        prev = amax.get(module.layer_id)
        amax[module.layer_id] = seen if prev is None else torch.maximum(prev, seen)

    handles = [
        m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, Attention)
    ]
    try:
        yield amax
    finally:
        for h in handles:
            h.remove()


def resolve_kv_scales(
    kv_dtype: torch.dtype,
    kv_cache_dtype: str,
    checkpoint: dict[int, dict[str, float]],
    num_layers: int,
    calibrate: Callable[[], dict[int, tuple[float, float]]],
) -> list[tuple[float, float]]:
    """Per-layer (k_scale, v_scale): the checkpoint's where given, else calibrated; 1.0 off fp8.

    `calibrate()` runs the calibration prefill and returns layer → (amax k, amax v); it is called
    only for an fp8 cache with a layer the checkpoint gives no scales for.
    """
    if kv_dtype.itemsize != 1:
        if checkpoint:
            logger.info(
                "the checkpoint has KV-cache scales for %d layers; unused with kv_cache_dtype=%s "
                "(pass kv_cache_dtype='fp8_e4m3' to use them)",
                len(checkpoint),
                kv_cache_dtype,
            )
        return [(1.0, 1.0)] * num_layers
    _check(checkpoint, num_layers)
    missing = [i for i in range(num_layers) if set(checkpoint.get(i, {})) != {"k", "v"}]
    amax = calibrate() if missing else {}
    scales = []
    for i in range(num_layers):
        got = checkpoint.get(i, {})
        a = amax.get(i, (0.0, 0.0))
        k = got["k"] if "k" in got else calibrated_scale(a[0], kv_dtype)
        v = got["v"] if "v" in got else calibrated_scale(a[1], kv_dtype)
        scales.append((k, v))
    _log(kv_cache_dtype, scales, missing, num_layers)
    return scales


def _check(checkpoint: dict[int, dict[str, float]], num_layers: int) -> None:
    """Checkpoint scales name existing layers and are finite and positive."""
    for layer, kv in checkpoint.items():
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"the checkpoint has KV-cache scales for layer {layer}, but the model has "
                f"{num_layers} layers; the checkpoint's scale tensors do not fit its config.json"
            )
        for name, s in kv.items():
            if not (s > 0 and s != float("inf")):
                raise ValueError(
                    f"model.layers.{layer}.self_attn.{name}_scale is {s}; a KV-cache scale must "
                    f"be finite and positive"
                )


def _log(kv_cache_dtype: str, scales: list, missing: list[int], num_layers: int) -> None:
    """Say where the scales came from."""
    ks, vs = [s[0] for s in scales], [s[1] for s in scales]
    span = f"k_scale {min(ks):.4g}–{max(ks):.4g}, v_scale {min(vs):.4g}–{max(vs):.4g}"
    if not missing:
        logger.info(
            "fp8 KV cache (%s): the checkpoint's per-layer scales, %s", kv_cache_dtype, span
        )
        return
    raised = sum(k > 1.0 or v > 1.0 for i, (k, v) in enumerate(scales) if i in missing)
    logger.warning(
        "kv_cache_dtype=%s but the checkpoint has no KV-cache scales for %d of %d layers: "
        "calibrated them on a start-up prefill as max(1, %g·amax/fp8_max) (%d above 1.0); %s. "
        "For scales from your own data, use a checkpoint quantized with KV-cache calibration",
        kv_cache_dtype,
        len(missing),
        num_layers,
        HEADROOM,
        raised,
        span,
    )
