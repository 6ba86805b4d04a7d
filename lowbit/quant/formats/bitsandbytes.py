"""bitsandbytes (transformers `BitsAndBytesConfig`; Unsloth's bnb-4bit uploads): 4-bit nf4/fp4
with optional double quantization, and LLM.int8 8-bit.

4-bit tensors live under `<module>.weight.*`; they are renamed to `weight_absmax`,
`weight_quant_map`, `weight_nested_absmax`, `weight_nested_quant_map`, and the JSON quant state
becomes `weight_nested_offset`. Modules without bnb tensors are unquantized.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from lowbit.quant.formats.base import FormatResult, TensorIndex, linear_modules, substring_match
from lowbit.quant.spec import ActQuant, PerChannel, PerGroup, QuantSpec

BLOCKSIZE, NESTED_BLOCKSIZE = 64, 256
_RENAMES = {
    "weight.absmax": "weight_absmax",
    "weight.quant_map": "weight_quant_map",
    "weight.nested_absmax": "weight_nested_absmax",
    "weight.nested_quant_map": "weight_nested_quant_map",
}


def parse(qcfg: dict, index: TensorIndex) -> FormatResult:
    """bnb specs per module, from the tensors each module has."""
    skip = qcfg.get("llm_int8_skip_modules") or []
    specs: dict[str, QuantSpec | None] = {}
    kinds = set()
    for module in linear_modules(index, (".weight",)):
        spec = None
        if not any(substring_match(module, s) for s in skip):
            spec = _module_spec(qcfg, index, module)
        specs[module] = spec
        if spec is not None:
            kinds.add(spec.weight if spec.layout == "bnb4" else "int8 (LLM.int8)")
    kind = f"bitsandbytes {'/'.join(sorted(kinds)) or 'unquantized'}"
    return FormatResult("bitsandbytes", kind, specs, ("bitsandbytes",), convert=_convert)


def _module_spec(qcfg: dict, index: TensorIndex, module: str) -> QuantSpec | None:
    """bnb4 when `weight.absmax` exists, bnb8 when `SCB` does, else unquantized."""
    if index.has(module, "weight.absmax"):
        kind = "fp4" if index.has(module, "weight.quant_state.bitsandbytes__fp4") else "nf4"
        double = index.has(module, "weight.nested_absmax")
        return QuantSpec(kind, PerGroup(BLOCKSIZE), "bnb4", scale_dtype="dq8" if double else "fp32")
    if index.has(module, "SCB"):
        threshold = float(qcfg.get("llm_int8_threshold", 6.0))
        act = ActQuant("int8", "dynamic_token", threshold=threshold)
        return QuantSpec("int8", PerChannel(), "bnb8", act=act)
    return None


def _convert(name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
    """Rename `weight.*` tensors; the JSON quant state → its nested offset (sizes checked)."""
    for suffix, canon in _RENAMES.items():
        if name.endswith("." + suffix):
            module = name[: -len(suffix) - 1]
            if suffix == "weight.absmax":
                tensor = tensor.reshape(-1)
                tensor = tensor if tensor.dtype == torch.uint8 else tensor.float()
            return [(f"{module}.{canon}", tensor)]
    if ".weight.quant_state.bitsandbytes__" in name:
        module = name.split(".weight.quant_state.")[0]
        state = json.loads(bytes(tensor.tolist()).decode())
        if state.get("blocksize") != BLOCKSIZE or state.get("nested_blocksize", 256) != 256:
            raise ValueError(f"{name}: bitsandbytes blocksize {state.get('blocksize')} / nested "
                             f"{state.get('nested_blocksize')} is not supported; supported: "
                             f"{BLOCKSIZE} / {NESTED_BLOCKSIZE}")  # fmt: skip
        if "nested_offset" not in state:
            return []
        return [(f"{module}.weight_nested_offset", torch.tensor([state["nested_offset"]]))]
    return [(name, tensor)]
