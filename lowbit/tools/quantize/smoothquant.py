"""SmoothQuant (Xiao et al.): move activation outliers into the weights before W8A8.

s_j = max|x_j|^α / max|W_j|^(1-α) per input channel j; the norm before the linears is divided by
s and their weights multiplied by it, so the output is unchanged and activations get flatter.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ALPHA = 0.5
MAPPINGS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


@torch.no_grad()
def smooth_layer(layer: nn.Module, act_max: dict[str, Tensor], alpha: float = ALPHA) -> None:
    """Apply smoothing in place; act_max: local linear name → per-channel max|x| (K,)."""
    mods = dict(layer.named_modules())
    for norm_name, names in MAPPINGS:
        names = [n for n in names if n in mods]
        if not names or norm_name not in mods:
            continue
        linears = [mods[n] for n in names]
        a = act_max[names[0]].float()
        w = torch.cat([lin.weight.abs() for lin in linears]).float().amax(0)  # (K,)
        s = a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)
        s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
        mods[norm_name].weight.div_(s.to(mods[norm_name].weight.dtype))
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype))
