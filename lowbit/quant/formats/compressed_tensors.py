"""compressed-tensors (llm-compressor): config_groups of QuantizationArgs, `ignore`, formats.

Specs come from the first config group whose targets match a module (`re:` regex, module name,
or the class "Linear"); `ignore` wins. Layouts: pack-quantized (int W4/W8 A16), int-quantized
(W8A8), float-quantized / naive (FP8 tensor/channel/block), nvfp4- and mxfp4-pack-quantized.
"""

from __future__ import annotations

from lowbit.quant.formats.base import FormatResult, TensorIndex, ct_match, linear_modules
from lowbit.quant.spec import (
    ActQuant,
    PerBlock,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
)

METHOD = "compressed-tensors"


def _granularity(w: dict):
    """QuantizationArgs strategy → granularity."""
    strategy = w.get("strategy") or "tensor"
    if strategy in ("group", "tensor_group"):
        return PerGroup(int(w["group_size"]))
    if strategy == "channel":
        return PerChannel()
    if strategy == "block":
        n, k = w["block_structure"]
        return PerBlock(int(n), int(k))
    if strategy == "tensor":
        return PerTensor()
    raise ValueError(
        f"compressed-tensors weight strategy {strategy!r} is not supported; "
        "supported: tensor, channel, group, tensor_group, block"
    )


def _act(a: dict | None, weight_type: str) -> ActQuant | None:
    """input_activations → ActQuant (int8 absmax divisor is (127 − (−128)) / 2 = 127.5)."""
    if a is None:
        return None
    if not a.get("symmetric", True):
        raise ValueError("compressed-tensors asymmetric input activations are not supported")
    bits, typ, strategy, dynamic = a["num_bits"], a["type"], a.get("strategy"), a.get("dynamic")
    if typ == "float" and bits == 4:
        return ActQuant("fp4_e2m1", "dynamic_group", int(a.get("group_size") or 16))
    dtype = "fp8_e4m3" if typ == "float" else f"int{bits}"
    qmax = 127.5 if dtype == "int8" else None
    if strategy == "token" and dynamic:
        return ActQuant(dtype, "dynamic_token", qmax=qmax)
    if strategy == "tensor" and not dynamic:
        return ActQuant(dtype, "static_tensor", qmax=qmax)
    if strategy == "tensor" and dynamic:
        return ActQuant(dtype, "dynamic_tensor", qmax=qmax)
    if strategy == "group" and dynamic:
        return ActQuant(dtype, "dynamic_group", int(a["group_size"]), qmax=qmax)
    raise ValueError(
        f"compressed-tensors input activations {strategy}/dynamic={dynamic} are "
        "not supported; supported: token dynamic, tensor static/dynamic, group"
    )


def group_spec(group: dict, fmt: str) -> QuantSpec:
    """One config group (weights + input_activations + format) → QuantSpec."""
    w = group["weights"]
    gran, act = _granularity(w), _act(group.get("input_activations"), w["type"])
    bits, typ = int(w["num_bits"]), w["type"]
    if typ == "float" and bits == 4:
        mx = w.get("scale_dtype") in ("torch.uint8", "uint8") or fmt.startswith("mxfp4")
        layout = "ct_mxfp4" if mx else "ct_nvfp4"
        scale = "e8m0" if mx else "fp8_e4m3"
        return QuantSpec("fp4_e2m1", gran, layout, scale_dtype=scale, global_scale=not mx, act=act)
    if typ == "float":
        return QuantSpec("fp8_e4m3", gran, "scaled", act=act)
    if act is not None:  # int-quantized W8A8
        if bits != 8 or not w.get("symmetric", True):
            raise ValueError(
                f"compressed-tensors int W{bits}A8 (symmetric={w.get('symmetric')}) "
                "is not supported; supported: symmetric int8 W8A8"
            )
        return QuantSpec("int8", gran, "scaled", act=act)
    if fmt not in ("pack-quantized", "mixed-precision"):
        raise ValueError(
            f"compressed-tensors format {fmt!r} for int{bits} weight-only is not "
            "supported; supported: pack-quantized"
        )
    order = w.get("actorder") in ("group", "dynamic")
    if isinstance(gran, PerTensor | PerBlock):
        raise ValueError(f"compressed-tensors int weight-only with {gran} scales is not supported")
    return QuantSpec(
        f"int{bits}", gran, "ct_pack", symmetric=bool(w.get("symmetric", True)), act_order=order
    )


def parse(qcfg: dict, index: TensorIndex) -> FormatResult:
    """Specs for every linear module in the checkpoint."""
    groups = qcfg.get("config_groups") or {}
    ignore = qcfg.get("ignore") or []
    top_fmt = qcfg.get("format") or "pack-quantized"
    specs: dict[str, QuantSpec | None] = {}
    seen: set[QuantSpec] = set()
    for module in linear_modules(index, (".weight", ".weight_packed")):
        spec = None
        if not any(ct_match(module, p) for p in ignore) and not _plain(index, module):
            for group in groups.values():
                if any(ct_match(module, t) for t in group.get("targets", [])):
                    fmt = group.get("format") or top_fmt
                    spec = group_spec(group, fmt)
                    break
        specs[module] = spec
        if spec is not None:
            seen.add(spec)
    kind = "compressed-tensors " + (" + ".join(sorted({_kind(s) for s in seen})) or "unquantized")
    return FormatResult(
        METHOD,
        kind,
        specs,
        _accepts(seen),
        kv_names={"k_proj.output_scale": "k_scale", "v_proj.output_scale": "v_scale"},
    )


def _plain(index: TensorIndex, module: str) -> bool:
    """A module stored in full precision despite matching a group (only `weight`, float)."""
    info = index.get(module, "weight")
    return (
        info is not None
        and info.dtype in ("BF16", "F16", "F32")
        and not index.has(module, "weight_scale")
    )


def _kind(spec: QuantSpec) -> str:
    """A few words for one spec."""
    act = "" if spec.act is None else f"A{spec.act.dtype}"
    return f"{spec.weight} {spec.granularity}{' ' + act if act else ''}"


def _accepts(specs: set[QuantSpec]) -> tuple[str, ...]:
    """compressed-tensors always; `w8a8_fp8` / `w8a8_int8` when every module is that scheme."""
    out = [METHOD, "compressed_tensors"]
    schemes = {s.scheme for s in specs}
    if schemes == {"w8a8_fp8"} and all(s.act is not None for s in specs):
        out.append("w8a8_fp8")
    if schemes == {"w8a8_int8"}:
        out.append("w8a8_int8")
    return tuple(out)
