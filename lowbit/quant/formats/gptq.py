"""GPTQ (AutoGPTQ / GPTQModel / optimum) and AutoAWQ: int weight-only, packed int32 words.

GPTQ: `qweight` (K·b/32, N), `qzeros` (K/G, N·b/32), `scales`, `g_idx`; v1 (`gptq`) stores
zero − 1, v2 (`gptq_v2`) the zero itself. GPTQModel's `dynamic` maps regexes to per-module
overrides (`-:` prefix: leave unquantized). AWQ GEMM: `qweight` (K, N/8) with interleaved nibbles;
GEMV: `qweight` (N, K/8) packed along K, `qzeros`/`scales` per row with padded group columns.
Modules that hold a plain float `weight` are unquantized whatever the config says.
"""

from __future__ import annotations

import re

from lowbit.quant.formats.base import FormatResult, TensorIndex, linear_modules, substring_match
from lowbit.quant.spec import PerChannel, PerGroup, QuantSpec


def int_spec(bits: int, group: int, sym: bool, layout: str, desc_act: bool = False) -> QuantSpec:
    """Weight-only int spec of one module."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"{bits}-bit GPTQ/AWQ weights are not supported; supported: 2, 3, 4, 8")
    gran = PerGroup(group) if group and group > 0 else PerChannel()
    return QuantSpec(f"int{bits}", gran, layout, symmetric=sym, act_order=desc_act)


def dynamic_override(dynamic: dict | None, module: str) -> dict | None:
    """GPTQModel `dynamic`: the first matching pattern's overrides; None for a `-:` skip."""
    for pattern, over in (dynamic or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], module):
                return None
        elif re.match(pattern.removeprefix("+:"), module):
            return over
    return {}


def parse_gptq(qcfg: dict, index: TensorIndex) -> FormatResult:
    """GPTQ v1/v2 specs per module (with `dynamic` overrides)."""
    fmt = (qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2") or qcfg.get("is_marlin_format"):
        raise ValueError(
            f"GPTQ checkpoint_format {fmt!r} is not supported; supported: gptq "
            "(v1), gptq_v2 — re-export the checkpoint without Marlin repacking"
        )
    specs: dict[str, QuantSpec | None] = {}
    bits_seen = set()
    for module in linear_modules(index, (".qweight", ".weight")):
        over = dynamic_override(qcfg.get("dynamic"), module)
        if over is None or not index.has(module, "qweight"):
            specs[module] = None
            continue
        cfg = {**qcfg, **over}
        specs[module] = int_spec(
            int(cfg["bits"]),
            int(cfg.get("group_size", -1)),
            bool(cfg.get("sym", True)),
            fmt,
            bool(cfg.get("desc_act")),
        )
        bits_seen.add(int(cfg["bits"]))
    kind = f"GPTQ {fmt} int{'/'.join(map(str, sorted(bits_seen)))}"
    return FormatResult("gptq", kind, specs, ("gptq", "gptq_marlin") + _auto_round(qcfg))


def parse_awq(qcfg: dict, index: TensorIndex) -> FormatResult:
    """AutoAWQ GEMM specs; `modules_to_not_convert` are substrings."""
    version = str(qcfg.get("version", "gemm")).lower()
    if version not in ("gemm", "gemv"):
        raise ValueError(f"AWQ version {version!r} is not supported; supported: gemm, gemv")
    layout = "awq" if version == "gemm" else "awq_gemv"
    bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
    group = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
    sym = not qcfg.get("zero_point", True)
    skip = qcfg.get("modules_to_not_convert") or []
    specs: dict[str, QuantSpec | None] = {}
    for module in linear_modules(index, (".qweight", ".weight")):
        quant = index.has(module, "qweight") and not any(substring_match(module, s) for s in skip)
        specs[module] = int_spec(bits, group, sym, layout) if quant else None
    kind = f"AWQ {version.upper()} int{bits} group{group}"
    return FormatResult("awq", kind, specs, ("awq", "awq_marlin") + _auto_round(qcfg))


def _auto_round(qcfg: dict) -> tuple[str, ...]:
    """auto-round's GPTQ/AWQ exports (provider auto-round) also answer to its own names."""
    return ("auto-round", "auto_round", "inc") if qcfg.get("provider") == "auto-round" else ()
