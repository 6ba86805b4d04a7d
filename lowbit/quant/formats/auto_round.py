"""Intel auto-round: GPTQ-, GPTQModel- or AWQ-packed int weights with `extra_config` overrides.

`packing_format` picks the layout: `auto_round:auto_gptq` (GPTQ, zeros stored − 1),
`auto_round` / `auto_round:gptqmodel` (GPTQ layout, raw zeros), `auto_round:auto_awq` (AWQ GEMM).
`extra_config` keys are module names (exact first) or regexes; `bits ≥ 16` means unquantized.
"""

from __future__ import annotations

import re

from lowbit.quant.formats.base import FormatResult, TensorIndex, linear_modules
from lowbit.quant.formats.gptq import int_spec
from lowbit.quant.spec import QuantSpec

LAYOUTS = {
    "auto_round:auto_gptq": "gptq",
    "auto_round:gptq": "gptq",
    "auto": "gptq",
    "auto_round": "gptq_v2",
    "auto_round:gptqmodel": "gptq_v2",
    "auto_round:auto_awq": "awq",
    "auto_round:awq": "awq",
}


def _override(extra: dict, module: str) -> dict:
    """extra_config entry for `module`: exact name first, then the first matching regex."""
    if module in extra:
        return extra[module]
    for pattern, over in extra.items():
        try:
            if re.search(pattern, module):
                return over
        except re.error:
            continue
    return {}


def parse(qcfg: dict, index: TensorIndex) -> FormatResult:
    """auto-round specs per module."""
    packing = qcfg.get("packing_format") or (
        "auto_round:auto_gptq" if qcfg.get("sym", True) else "auto_round"
    )
    if packing not in LAYOUTS:
        raise ValueError(
            f"auto-round packing_format {packing!r} is not supported; supported: {sorted(LAYOUTS)}"
        )
    if qcfg.get("data_type", "int") != "int" or int(qcfg.get("act_bits", 16)) < 16:
        raise ValueError(
            f"auto-round data_type {qcfg.get('data_type')!r} / act_bits "
            f"{qcfg.get('act_bits')} is not supported; supported: int weight-only"
        )
    layout = LAYOUTS[packing]
    extra = qcfg.get("extra_config") or {}
    specs: dict[str, QuantSpec | None] = {}
    for module in linear_modules(index, (".qweight", ".weight")):
        cfg = {**qcfg, **_override(extra, module)}
        if int(cfg.get("bits", 4)) >= 16 or not index.has(module, "qweight"):
            specs[module] = None
            continue
        specs[module] = int_spec(
            int(cfg["bits"]), int(cfg.get("group_size", 128)), bool(cfg.get("sym", True)), layout
        )
    kind = f"auto-round {packing} int{qcfg.get('bits', 4)}"
    return FormatResult("auto-round", kind, specs, ("auto-round", "auto_round", "inc"))
