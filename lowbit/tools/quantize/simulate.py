"""A fake-quantized transformers model: dense dequantized weights plus activation quant hooks.

Built either from calibration results in memory or from an export read back from disk; both
must give the same logits, which is how the tests check the writers and readers against each
other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lowbit.quant.numerics import dequantize, fake_quant_activation


def fake_quant_model(
    src_dir: str | Path,
    dense: dict[str, Tensor],
    acts: dict[str, tuple[str, Tensor | None] | None],
    plain: dict[str, Tensor],
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The source model with `dense` weights, `plain` tensors and activation fake-quant hooks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        src_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).to(device)
    model.eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for mod, w in dense.items():
            params[f"{mod}.weight"].copy_(w.to(torch.float32))
        for name, t in plain.items():
            if name in params:
                params[name].copy_(t.to(torch.float32))
    modules = dict(model.named_modules())
    for mod, act in acts.items():
        if act is not None:
            kind, scale = act
            scale = None if scale is None else scale.to(device)
            modules[mod].register_forward_pre_hook(
                lambda _m, args, k=kind, s=scale: (fake_quant_activation(args[0], k, s),)
            )
    return model


def from_state(src_dir: str | Path, state, method, device="cpu") -> nn.Module:
    """The in-memory fake-quantized model of a CalibState."""
    dense, acts = {}, {}
    for mod, r in state.results.items():
        dense[mod] = dequantize(state.kind, r)
        if method.act is None:
            acts[mod] = None
        elif method.act == "fp8-static":
            acts[mod] = (method.act, r["input_scale"].float())
        elif method.act == "nvfp4":
            acts[mod] = (method.act, r["input_global_scale"].float())
        else:
            acts[mod] = (method.act, None)
    return fake_quant_model(src_dir, dense, acts, state.overrides, device)


def from_export(src_dir: str | Path, export_dir: str | Path, device="cpu") -> nn.Module:
    """The fake-quantized model an export describes, read back from disk."""
    from lowbit.tools.quantize.readback import read_export

    dense, acts, plain = read_export(export_dir)
    return fake_quant_model(src_dir, dense, acts, plain, device)
