"""`quant_method: fp8`: AutoFP8 per-tensor (static/dynamic inputs) and DeepSeek-style block FP8.

Per-tensor: `weight` F8_E4M3, `weight_scale` () multiplier, `input_scale` () when static.
Block: `weight_block_size` [bn, bk], `weight_scale_inv` (N/bn, K/bk) multiplier (F32, or F8_E8M0
for ue8m0 checkpoints), activations dynamic per token per bk channels.
`modules_to_not_convert` / `ignored_layers`: substrings or `re:` regexes.
"""

from __future__ import annotations

from lowbit.quant.formats.base import FormatResult, TensorIndex, linear_modules, substring_match
from lowbit.quant.spec import ActQuant, PerBlock, PerTensor, QuantSpec


def parse(qcfg: dict, index: TensorIndex) -> FormatResult:
    """FP8 specs per module."""
    scheme = qcfg.get("activation_scheme", "dynamic")
    if scheme not in ("static", "dynamic"):
        raise ValueError(f"fp8 activation_scheme {scheme!r} is not supported; use static/dynamic")
    fmt = qcfg.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"fp8 fmt {fmt!r} is not supported; supported: e4m3")
    block = qcfg.get("weight_block_size")
    skip = (qcfg.get("modules_to_not_convert") or []) + (qcfg.get("ignored_layers") or [])
    if block is not None:
        if scheme != "dynamic":
            raise ValueError("block FP8 needs activation_scheme 'dynamic'")
        bn, bk = (int(v) for v in block)
        spec = QuantSpec(
            "fp8_e4m3", PerBlock(bn, bk), "scaled", act=ActQuant("fp8_e4m3", "dynamic_group", bk)
        )
        kind = f"FP8 block {bn}x{bk}"
    else:
        mode = "static_tensor" if scheme == "static" else "dynamic_token"
        spec = QuantSpec("fp8_e4m3", PerTensor(), "scaled", act=ActQuant("fp8_e4m3", mode))
        kind = f"FP8 per-tensor, {scheme} activations"
    specs = {}
    for module in linear_modules(index, (".weight",)):
        info = index.get(module, "weight")
        quant = info.dtype.startswith("F8") and not any(substring_match(module, s) for s in skip)
        specs[module] = spec if quant else None
    return FormatResult(
        "fp8", kind, specs, ("fp8", "w8a8_fp8"), renames={"weight_scale_inv": "weight_scale"}
    )
