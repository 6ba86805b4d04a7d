"""Layer-by-layer calibration: one decoder layer on the device at a time.

For each layer: materialize it, run the calibration hidden states through it while hooks record
what the method needs (Hessians, inputs, activation maxima), apply the algorithm (AWQ / SmoothQuant
rescaling, GPTQ), quantize every linear into canonical form, replace its weight by the
dequantized one, and run the layer again so the next layer sees the quantization error.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from lowbit.quant.numerics import (
    dequantize,
    nvfp4_global_scale,
    quantize_fp8,
    quantize_int,
    quantize_nvfp4,
)
from lowbit.tools.quantize.awq import awq_layer
from lowbit.tools.quantize.gptq import Hessian, gptq_quantize
from lowbit.tools.quantize.methods import Method
from lowbit.tools.quantize.smoothquant import smooth_layer
from lowbit.tools.quantize.source import SourceModel, fused_group, linear_modules

BATCH = 8


def matches(name: str, patterns: list[str]) -> bool:
    """compressed-tensors matching: 're:' regex from the start, else exact name or wildcard."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif name == p or fnmatch.fnmatchcase(name, p):
            return True
    return False


@dataclass
class CalibState:
    """Everything calibration produced: canonical results per linear and changed fp tensors."""

    kind: str
    results: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    overrides: dict[str, Tensor] = field(default_factory=dict)

    def save(self, path: Path, meta: dict) -> None:
        """Write the state (safetensors + meta.json) so a later run can skip calibration."""
        path.mkdir(parents=True, exist_ok=True)
        flat = {f"q::{m}::{k}": t.contiguous() for m, r in self.results.items()
                for k, t in r.items()}  # fmt: skip
        flat.update({f"o::{n}": t.contiguous() for n, t in self.overrides.items()})
        save_file(flat, str(path / "calibration_state.safetensors"))
        (path / "calibration_meta.json").write_text(
            json.dumps({**meta, "kind": self.kind}, indent=2, sort_keys=True)
        )

    @classmethod
    def load(cls, path: Path, meta: dict) -> CalibState:
        """Read a saved state; it must come from the same model and settings."""
        mfile, tfile = path / "calibration_meta.json", path / "calibration_state.safetensors"
        if not (mfile.is_file() and tfile.is_file()):
            raise FileNotFoundError(f"{path} holds no calibration state (from "
                                    f"--checkpoint-save-path); expected {mfile.name}")  # fmt: skip
        saved = json.loads(mfile.read_text())
        diff = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
        if diff:
            raise ValueError(
                f"calibration state in {path} was made with other settings "
                f"(saved, now): {diff}; rerun without --checkpoint-restore-path"
            )
        state = cls(saved["kind"])
        for key, t in load_file(str(tfile)).items():
            tag, rest = key.split("::", 1)
            if tag == "q":
                mod, k = rest.split("::")
                state.results.setdefault(mod, {})[k] = t
            else:
                state.overrides[rest] = t
        return state


def _run(layer: nn.Module, hidden: Tensor, pe) -> Tensor:
    """Layer output for all samples (S, T, H), in batches."""
    outs = []
    for i in range(0, hidden.shape[0], BATCH):
        h = hidden[i : i + BATCH]
        outs.append(layer(h, attention_mask=None, position_embeddings=pe, use_cache=False))
    return torch.cat(outs)


def _collect(layer, hidden, pe, linears: dict[str, nn.Linear], method: Method, prefix: str):
    """Run the layer once with hooks; returns what the method needs, keyed by local name."""
    need_h = method.algorithm == "gptq"
    need_x = method.algorithm == "awq"
    need_cmax = method.algorithm == "smoothquant"
    need_amax = method.act in ("fp8-static", "nvfp4")
    stats: dict[str, dict] = {}
    handles = []
    for full, mod in linears.items():
        local = full[len(prefix) + 1 :]
        st = stats[local] = {"xs": [], "amax": torch.zeros((), device=hidden.device),
                             "cmax": None, "H": Hessian(mod.in_features, hidden.device)
                             if need_h else None}  # fmt: skip

        def hook(_m, args, st=st):
            x = args[0].detach()
            if need_h:
                st["H"].add(x)
            if need_x:
                st["xs"].append(x)
            if need_amax:
                st["amax"] = torch.maximum(st["amax"], x.abs().amax().float())
            if need_cmax:
                cm = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
                st["cmax"] = cm if st["cmax"] is None else torch.maximum(st["cmax"], cm)

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            _run(layer, hidden, pe)
    finally:
        for h in handles:
            h.remove()
    return stats


def _quantize_linear(w, st, method: Method, opts, scale_dtype, group_amax) -> dict:
    """Canonical result for one linear (plus its activation scales)."""
    if method.weight == "int":
        if method.algorithm == "gptq":
            r = gptq_quantize(w, st["H"].H, method.bits, opts.group_size, method.sym,
                              scale_dtype, act_order=opts.act_order)  # fmt: skip
        else:
            r = quantize_int(w, method.bits, opts.group_size, method.sym, scale_dtype)
    elif method.weight == "fp8":
        amax = group_amax if method.formats == ("modelopt",) else None
        r = quantize_fp8(w, method.fp8_strategy, scale_dtype, amax=amax)
    else:
        r = quantize_nvfp4(w, nvfp4_global_scale(group_amax))
    if method.act == "fp8-static":
        r["input_scale"] = (st["amax"] / 448.0).clamp_min(1e-12).reshape(1).float()
    elif method.act == "nvfp4":
        r["input_global_scale"] = nvfp4_global_scale(st["amax"])
    return {k: v.cpu() for k, v in r.items()}


def calibrate(src: SourceModel, method: Method, opts, wins, scale_dtype, progress=True):
    """Quantize every decoder layer of `src` → CalibState."""
    state = CalibState(method.weight)
    needs_data = method.needs_calibration
    hidden = pe = None
    if needs_data:
        hidden = src.embed(wins)  # (S, T, H)
        pe = src.rotary(hidden)
    bar = tqdm(range(len(src.layers)), desc=f"Calibrating ({method.name})", disable=not progress)
    for i in bar:
        prefix = src.layer_prefix(i)
        layer = src.materialize(src.layers[i], prefix)
        linears = {n: m for n, m in linear_modules(layer, prefix).items()
                   if not matches(n, opts.ignore)}  # fmt: skip
        stats = _collect(layer, hidden, pe, linears, method, prefix) if needs_data else {}
        skip = {n[len(prefix) + 1 :] for n in linear_modules(layer, prefix) if n not in linears}
        if method.algorithm == "awq":
            inputs = {k: torch.cat(v["xs"]) for k, v in stats.items()}
            qdq = lambda w: dequantize("int", quantize_int(
                w, method.bits, opts.group_size, method.sym, scale_dtype))  # fmt: skip
            awq_layer(layer, inputs, pe, qdq, opts.group_size, skip)
            del inputs
        elif method.algorithm == "smoothquant":
            smooth_layer(layer, {k: v["cmax"] for k, v in stats.items()})
        names = list(linears)
        for full, mod in linears.items():
            group = fused_group(full, names)
            gamax = torch.stack([linears[g].weight.abs().amax().float() for g in group]).amax()
            st = stats.get(full[len(prefix) + 1 :], {})
            w = mod.weight.detach().float()
            r = _quantize_linear(w, st, method, opts, scale_dtype, gamax)
            state.results[full] = r
            with torch.no_grad():
                mod.weight.copy_(dequantize(method.weight, r).to(mod.weight.dtype))
        _record_overrides(src, layer, prefix, linears, state)
        del stats
        if needs_data:
            with torch.no_grad():
                hidden = _run(layer, hidden, pe)
        src.release(layer)
    return state


def _record_overrides(src, layer, prefix, linears, state: CalibState) -> None:
    """Full-precision tensors the algorithm changed (smoothed norms, rescaled ignored linears)."""
    for name, t in layer.state_dict().items():
        full = f"{prefix}.{name}"
        if full.rsplit(".", 1)[0] in linears and name.endswith("weight"):
            continue  # quantized: its canonical result is written instead
        orig = src.read(full)
        if not torch.equal(orig, t.detach().cpu().to(orig.dtype)):
            state.overrides[full] = t.detach().cpu().to(orig.dtype)
