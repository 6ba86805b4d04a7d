"""Read an export back into dense weights, following formats.md's unpack rules literally.

Independent of the writers (it shares no packing code with them), this is the oracle the tests use
for every layout and the fallback the quality gate evaluates with when lowbit's own loader does
not yet read a format. Returns (dense weights per module, activation quantization per module,
every other tensor).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from lowbit.loader.weights import iterate_tensors, safetensors_files

_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
_AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def _u32(t: Tensor) -> Tensor:
    """int32 words reinterpreted as unsigned (in int64)."""
    return t.long() & 0xFFFFFFFF


def _unpack_seq(words: Tensor, bits: int, dim: int) -> Tensor:
    """Sequential little-endian fields of int32 words, expanded along `dim` (0 or 1)."""
    pf, mask = 32 // bits, 2**bits - 1
    w = _u32(words)
    fields = torch.stack([(w >> (bits * i)) & mask for i in range(pf)], dim=dim + 1)
    shape = list(words.shape)
    shape[dim] *= pf
    return fields.reshape(shape)


def _fp4(packed: Tensor) -> Tensor:
    """uint8 (N, K/2), low nibble = even k → fp32 (N, K) e2m1 values."""
    p = packed.long()
    codes = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)
    return torch.tensor(_E2M1)[codes]


def _ct_dense(t: dict[str, Tensor], wargs: dict) -> Tensor:
    """Dense weight of one compressed-tensors linear."""
    if "weight_packed" in t and t["weight_packed"].dtype == torch.uint8:  # NVFP4
        v = _fp4(t["weight_packed"])
        s = t["weight_scale"].float() / t["weight_global_scale"].float()
        return v * s.repeat_interleave(16, 1)
    if "weight_packed" in t:
        b = wargs["num_bits"]
        N, K = (int(x) for x in t["weight_shape"])
        q = _unpack_seq(t["weight_packed"], b, 1)[:, :K] - 2 ** (b - 1)
        s = t["weight_scale"].float()
        zp = torch.zeros_like(s)
        if "weight_zero_point" in t:
            zp = (_unpack_seq(t["weight_zero_point"], b, 0)[:N] - 2 ** (b - 1)).float()
        if "weight_g_idx" in t:
            gi = t["weight_g_idx"].long()
        else:
            gi = torch.arange(K) // (K // s.shape[1])
        return (q.float() - zp[:, gi]) * s[:, gi]
    q, s = t["weight"].float(), t["weight_scale"].float()
    if wargs["strategy"] == "block":  # each scale covers a (bn, bk) tile
        bn, bk = wargs["block_structure"]
        s = s.repeat_interleave(bn, 0)[: q.shape[0]].repeat_interleave(bk, 1)[:, : q.shape[1]]
    return q * s


def _ct_act(t: dict[str, Tensor], aargs: dict | None):
    """Activation quantization of one compressed-tensors linear."""
    if aargs is None:
        return None
    if aargs["type"] == "int":
        return ("int8-token", None)
    if aargs["num_bits"] == 4:
        return ("nvfp4", t["input_global_scale"].float().reshape(1))
    if aargs["strategy"] == "tensor":
        return ("fp8-static", t["input_scale"].float().reshape(1))
    return ("fp8-group128" if aargs["strategy"] == "group" else "fp8-token", None)


def _awq_dense(t: dict[str, Tensor], group: int) -> Tensor:
    """W (N, K) of an AWQ GEMM linear: (q − z) · s, zeros stored as is."""

    def unpack(x):
        w = _u32(x)
        cols = [(w >> (4 * _AWQ_REVERSE_ORDER[c])) & 0xF for c in range(8)]
        return torch.stack(cols, -1).reshape(x.shape[0], -1)  # (R, N)

    q, z, s = unpack(t["qweight"]), unpack(t["qzeros"]), t["scales"].float()
    gi = torch.arange(q.shape[0]) // group
    return ((q - z[gi]).float() * s[gi]).T


def _gptq_dense(t: dict[str, Tensor], bits: int, v1: bool) -> Tensor:
    """W (N, K) of a GPTQ linear: scales[g_idx[k], n] · (q[k, n] − zeff[g_idx[k], n])."""
    q = _unpack_seq(t["qweight"], bits, 0)  # (K, N)
    z = _unpack_seq(t["qzeros"], bits, 1) + (1 if v1 else 0)  # (ng, N)
    gi = t["g_idx"].long()
    return (t["scales"].float()[gi] * (q - z[gi]).float()).T


def read_export(export_dir: str | Path):
    """(dense {module: W fp32}, acts {module: (act, scale) or None}, plain {name: tensor})."""
    d = Path(export_dir)
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    by_module: dict[str, dict[str, Tensor]] = {}
    for name, t, _ in iterate_tensors(safetensors_files(d)):
        mod, leaf = name.rsplit(".", 1)
        by_module.setdefault(mod, {})[leaf] = t
    method = qc["quant_method"]
    markers = {"weight_packed", "weight_scale", "qweight"}
    dense, acts, plain = {}, {}, {}
    for mod, t in by_module.items():
        if not markers & set(t):
            plain.update({f"{mod}.{k}": v for k, v in t.items()})
            continue
        if method == "compressed-tensors":
            grp = qc["config_groups"]["group_0"]
            dense[mod] = _ct_dense(t, grp["weights"])
            acts[mod] = _ct_act(t, grp.get("input_activations"))
        elif method == "awq":
            dense[mod], acts[mod] = _awq_dense(t, qc["group_size"]), None
        elif method == "gptq":
            v1 = qc.get("checkpoint_format", "gptq") == "gptq"
            dense[mod], acts[mod] = _gptq_dense(t, qc["bits"], v1), None
        elif method == "modelopt":
            if t["weight"].dtype == torch.uint8:
                v = _fp4(t["weight"])
                s = t["weight_scale"].float() * t["weight_scale_2"].float()
                dense[mod] = v * s.repeat_interleave(16, 1)
                acts[mod] = ("nvfp4", (1.0 / t["input_scale"].float()).reshape(1))
            else:
                dense[mod] = t["weight"].float() * t["weight_scale"].float()
                acts[mod] = ("fp8-static", t["input_scale"].float().reshape(1))
        else:
            raise ValueError(f"cannot read back quant_method {method!r}")
        if "bias" in t:
            plain[f"{mod}.bias"] = t["bias"]
    return dense, acts, plain
