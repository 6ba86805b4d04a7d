"""NVIDIA ModelOpt exports: `hf_quant_config.json` or config.json `quant_method: modelopt`.

Per-algorithm tensors (formats.md §5): FP8 (`weight_scale`/`input_scale` scalars), FP8 per-channel
per-token (`weight_scale` (N,)), FP8_PB_WO (block weight-only), W8A8 SmoothQuant INT8,
INT4 AWQ (`weight` int4 packed along N, `pre_quant_scale`), NVFP4 (+AWQ), W4A16 NVFP4, MXFP8.
`exclude_modules` are fnmatch wildcards; MIXED_PRECISION lists `quantized_layers`.
KV-cache scales `k_proj.k_scale` / `v_proj.v_scale` feed an fp8 KV cache.

MXFP8 (not in formats.md; read from nvidia-modelopt 0.47). The recipe `MXFP8_DEFAULT_CFG`
(`modelopt_recipes/configs/numerics/mxfp8.yaml`) puts `num_bits: e4m3, block_sizes: {-1: 32,
type: dynamic, scale_bits: e8m0}` on every `*weight_quantizer` and `*input_quantizer`.
* Config: `get_quant_config`/`process_layer_quant_config` (torch/export/quant_utils.py) write
  `{"quant_algo": "MXFP8", "group_size": 32}`; `_quant_algo_to_group_config`
  (torch/export/convert_hf_config.py) writes config.json `weights` and `input_activations` as
  `{num_bits: 8, type: float, group_size: 32}` (`dynamic: false` although activations are dynamic).
* Tensors (`_export_quantized_weight`, torch/export/unified_export_hf.py): `weight` F8_E4M3
  (N, K) = `MXFP8QTensor.quantize_with_scale` = e4m3(clamp(W · 2^(127 − s), ±448)), round to
  nearest even; `weight_scale` U8 (N, K/32) = s, the biased e8m0 exponent
  (`MXFP8QTensor.get_weights_scaling_factor`, torch/quantization/qtensor/mxfp8_tensor.py:
  s = clamp(ceil(log2(amax_32 / 448)), −127, 127) + 127, an all-zero block gives 0). No
  `input_scale`: MX quantizers have no amax (`TensorQuantizer.amax` is None when
  `is_mx_format`), and the export writes one only for a non-None amax. K % 32 == 0 (asserted).
* Activations, at calibration (`_fake_quantize` → `dynamic_block_quant` → the CUDA extension
  `fused_amax_convert`, torch/kernels/quantization/gemm/tensor_quant_mx.cu): per row, per 32
  consecutive inputs, `compute_scale_e8m0_NV`: scale 2^ceil(log2(fp32(amax / 448))) (exact via the
  exponent bits; amax 0 → 1), then `__nv_fp8_e4m3` (RNE, saturating) of x / scale, times scale.
  This is NVIDIA's "RCEIL" rule (cuBLAS block scaling, FlashInfer/TensorRT-LLM
  `cvt.rp.satfinite.ue8m0x2.f32`), not the OCP spec's floor(log2(amax)) − 8.
* Runtimes: vLLM `ModelOptMxFp8Config`/`ModelOptMxFp8LinearMethod`
  (vllm/model_executor/layers/quantization/modelopt.py; `--quantization modelopt_mxfp8`, chosen
  when quant_algo contains "MXFP8") registers exactly `weight` e4m3 (N, K) and `weight_scale`
  uint8 (N, K/32), unswizzled on disk, and quantizes activations at run time
  (`mxfp8_e4m3_quantize`, utils/mxfp8_utils.py; its torch reference uses
  ceil(log2(amax / 448)) — some older copies used floor(log2(amax)), which differs from ModelOpt).
"""

from __future__ import annotations

from torch import Tensor

from lowbit.kernels.codes import MX_BLOCK
from lowbit.quant.formats.base import FormatResult, TensorIndex, linear_modules, wildcard_match
from lowbit.quant.spec import (
    ActQuant,
    PerBlock,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
)

FP8_STATIC = ActQuant("fp8_e4m3", "static_tensor")
NVFP4_ACT = ActQuant("fp4_e2m1", "dynamic_group", 16)
MX_ACT = ActQuant("fp8_e4m3", "dynamic_group", MX_BLOCK, scale_dtype="e8m0")


def algo_spec(algo: str, group: int | None, pqs: bool) -> QuantSpec:
    """One ModelOpt quant_algo → QuantSpec (`pqs`: the module has a pre_quant_scale)."""
    algo = algo.upper()
    if algo == "FP8":
        return QuantSpec("fp8_e4m3", PerTensor(), "scaled", act=FP8_STATIC)
    if algo == "FP8_PER_CHANNEL_PER_TOKEN":
        return QuantSpec(
            "fp8_e4m3", PerChannel(), "scaled", act=ActQuant("fp8_e4m3", "dynamic_token")
        )
    if algo == "FP8_PB_WO":
        return QuantSpec("fp8_e4m3", PerBlock(128, 128), "scaled")
    if algo == "W8A8_SQ_PER_CHANNEL":
        act = ActQuant("int8", "static_tensor")
        return QuantSpec("int8", PerChannel(), "scaled", act=act, pre_quant_scale=pqs)
    if algo in ("W4A16_AWQ", "INT4_AWQ"):
        return QuantSpec("int4", PerGroup(group or 128), "modelopt_int4", pre_quant_scale=pqs)
    if algo in ("NVFP4", "NVFP4_AWQ", "W4A16_NVFP4"):
        act = None if algo == "W4A16_NVFP4" else NVFP4_ACT
        return QuantSpec("fp4_e2m1", PerGroup(group or 16), "modelopt_nvfp4", global_scale=True,
                         act=act, pre_quant_scale=pqs)  # fmt: skip
    if algo == "MXFP8":
        if group not in (None, MX_BLOCK):
            raise ValueError(f"ModelOpt MXFP8 has group_size {group}; MX blocks are {MX_BLOCK}")
        return QuantSpec("fp8_e4m3", PerGroup(MX_BLOCK), "modelopt_mxfp8", scale_dtype="e8m0",
                         act=MX_ACT)  # fmt: skip
    raise ValueError(f"ModelOpt quant_algo {algo!r} is not supported; supported: FP8, "
                     "FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, W8A8_SQ_PER_CHANNEL, W4A16_AWQ, "
                     "NVFP4, NVFP4_AWQ, W4A16_NVFP4, MXFP8")  # fmt: skip


def _settings(qcfg: dict) -> dict:
    """The `quantization` block (hf_quant_config.json) or the flat config.json form."""
    q = qcfg.get("quantization", qcfg)
    return {
        "algo": q.get("quant_algo"),
        "group": q.get("group_size"),
        "exclude": q.get("exclude_modules") or q.get("ignore") or qcfg.get("ignore") or [],
        "layers": q.get("quantized_layers") or {},
    }


def parse(qcfg: dict, index: TensorIndex) -> FormatResult:
    """ModelOpt specs per module."""
    s = _settings(qcfg)
    if not s["algo"]:
        raise ValueError("ModelOpt config has no quant_algo")
    specs: dict[str, QuantSpec | None] = {}
    algos = set()
    for module in linear_modules(index, (".weight",)):
        info = index.get(module, "weight")
        excluded = any(wildcard_match(module, p) for p in s["exclude"])
        if excluded or (
            info.dtype in ("BF16", "F16", "F32") and not index.has(module, "weight_scale")
        ):
            specs[module] = None
            continue
        algo, group = s["algo"], s["group"]
        if algo.upper() == "MIXED_PRECISION":
            layer = s["layers"].get(module)
            if layer is None:
                specs[module] = None
                continue
            algo, group = layer["quant_algo"], layer.get("group_size", group)
        specs[module] = algo_spec(algo, group, index.has(module, "pre_quant_scale"))
        if specs[module].layout == "modelopt_mxfp8":
            _check_mx_tensors(index, module)
        algos.add(algo.upper())
    accepts = ["modelopt"]
    if algos and all("FP4" in a for a in algos):
        accepts.append("modelopt_fp4")
    if algos and all(a.startswith("FP8") for a in algos):
        accepts += (
            ["modelopt_fp8", "w8a8_fp8"]
            if algos == {"FP8_PER_CHANNEL_PER_TOKEN"}
            else ["modelopt_fp8"]
        )
    if algos == {"MXFP8"}:
        accepts.append("modelopt_mxfp8")  # vLLM's name for it
    kind = f"ModelOpt {'/'.join(sorted(algos)) or s['algo']}"
    block = any(a == "FP8_PB_WO" for a in algos)
    convert = _convert_block if block else _convert
    return FormatResult("modelopt", kind, specs, tuple(accepts), convert=convert)


def _check_mx_tensors(index: TensorIndex, module: str) -> None:
    """MXFP8 header check before any weight is read: e4m3 (…, K) codes, (…, K/32) e8m0 scales."""
    w, s = index.get(module, "weight"), index.get(module, "weight_scale")
    if w.dtype != "F8_E4M3" or w.shape[-1] % MX_BLOCK:
        raise ValueError(
            f"{module}.weight is {w.dtype} {list(w.shape)}; ModelOpt MXFP8 needs F8_E4M3 codes "
            f"with K a multiple of {MX_BLOCK}"
        )
    want = [*w.shape[:-1], w.shape[-1] // MX_BLOCK]
    if s is None or s.dtype != "U8" or list(s.shape) != want:
        have = "missing" if s is None else f"{s.dtype} {list(s.shape)}"
        raise ValueError(
            f"{module}.weight_scale is {have}; ModelOpt MXFP8 needs U8 e8m0 exponents of shape "
            f"{want} (one per {MX_BLOCK} inputs of weight {list(w.shape)})"
        )


def _convert(name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
    """Per-channel FP8 scales are written (N,): the scheme reads (N, 1)."""
    if name.endswith(".weight_scale") and tensor.dim() == 1:
        if tensor.dtype.is_floating_point and tensor.element_size() > 1:
            tensor = tensor.reshape(-1, 1)
    return [(name, tensor)]


def _convert_block(name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
    """FP8_PB_WO block scales (N/128, 1, K/128, 1) → (N/128, K/128); a single block is a scalar."""
    if name.endswith(".weight_scale"):
        if tensor.dim() == 4:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[2])
        elif tensor.dim() == 0:
            tensor = tensor.reshape(1, 1)
    return [(name, tensor)]
