"""NVIDIA ModelOpt exports: `hf_quant_config.json` or config.json `quant_method: modelopt`.

Per-algorithm tensors (formats.md §5): FP8 (`weight_scale`/`input_scale` scalars), FP8 per-channel
per-token (`weight_scale` (N,)), FP8_PB_WO (block weight-only), W8A8 SmoothQuant INT8,
INT4 AWQ (`weight` int4 packed along N, `pre_quant_scale`), NVFP4 (+AWQ), W4A16 NVFP4.
`exclude_modules` are fnmatch wildcards; MIXED_PRECISION lists `quantized_layers`.
KV-cache scales `k_proj.k_scale` / `v_proj.v_scale` feed an fp8 KV cache.
"""

from __future__ import annotations

from torch import Tensor

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
    raise ValueError(f"ModelOpt quant_algo {algo!r} is not supported; supported: FP8, "
                     "FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, W8A8_SQ_PER_CHANNEL, W4A16_AWQ, "
                     "NVFP4, NVFP4_AWQ, W4A16_NVFP4")  # fmt: skip


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
    kind = f"ModelOpt {'/'.join(sorted(algos)) or s['algo']}"
    block = any(a == "FP8_PB_WO" for a in algos)
    convert = _convert_block if block else _convert
    return FormatResult("modelopt", kind, specs, tuple(accepts), convert=convert)


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
