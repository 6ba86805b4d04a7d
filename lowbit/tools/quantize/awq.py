"""AWQ (Lin et al.): activation-aware per-input-channel scales, then weight clipping.

Follows AutoAWQ's quantizer (formats.md §1.7): for each group of linears sharing an input, grid
search s = x_mean^r / w_mean^(1-r) minimizing the block output MSE of Q(W·s)·(x/s); fold 1/s into
the previous op; then search per-group clipping of max|w| for all but q/k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

N_GRID = 20
MAX_SHRINK = 0.5
CLIP_TOKENS = 512

# (previous op, linears sharing its output, module whose output is matched or None for the linears)
MAPPINGS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ("self_attn.v_proj", ("self_attn.o_proj",), None),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ("mlp.up_proj", ("mlp.down_proj",), None),
)


def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, bs: int = 8) -> Tensor:
    """fn over the sample dim of x (S, T, K) in chunks."""
    return torch.cat([fn(x[i : i + bs]) for i in range(0, x.shape[0], bs)])


@torch.no_grad()
def awq_layer(
    layer: nn.Module,
    inputs: dict[str, Tensor],
    pe: tuple[Tensor, Tensor],
    qdq: Callable[[Tensor], Tensor],
    group_size: int,
    skip: set[str],
) -> None:
    """Search and apply AWQ scales and clipping to one decoder layer in place.

    inputs: local linear name → its captured input (S, T, K); qdq: fake-quantize a weight;
    skip: local names of linears that stay unquantized (left out of the search).
    """
    mods = dict(layer.named_modules())
    for prev_name, names, inspect_name in MAPPINGS:
        names = [n for n in names if n in mods and n not in skip]
        if not names or prev_name not in mods:
            continue
        prev, linears = mods[prev_name], [mods[n] for n in names]
        x = inputs[names[0]]  # (S, T, K)
        if isinstance(prev, nn.Linear) and prev.out_features != x.shape[-1]:
            continue  # e.g. v_proj → o_proj under GQA: shapes differ, nothing to fold
        if inspect_name is None:
            inspect = linears[0]
        elif inspect_name == "self_attn":
            attn = mods["self_attn"]
            inspect = lambda h, a=attn: a(hidden_states=h, position_embeddings=pe,
                                          attention_mask=None)[0]  # fmt: skip
        else:
            inspect = mods[inspect_name]
        s = _search_scale(x, linears, inspect, qdq, group_size)
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype))
        if isinstance(prev, nn.Linear):  # previous linear's output rows carry 1/s
            prev.weight.div_(s[:, None].to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:  # RMSNorm weight
            prev.weight.div_(s.to(prev.weight.dtype))
        xs = x / s.to(x.dtype)
        for name, lin in zip(names, linears):
            if not any(k in name for k in ("q_proj", "k_proj")):
                _clip(lin, xs, qdq, group_size)


def _search_scale(x, linears, inspect, qdq, group_size) -> Tensor:
    """Best per-input-channel scale s (K,) over the ratio grid."""
    K = x.shape[-1]
    G = K if group_size in (-1, 0) else group_size
    x_mean = x.abs().reshape(-1, K).float().mean(0)
    W = torch.cat([lin.weight for lin in linears]).float()  # (ΣN, K)
    wg = W.abs().reshape(-1, G)
    w_mean = (wg / wg.amax(1, keepdim=True).clamp_min(1e-12)).reshape(W.shape).mean(0)
    ref = _batched(inspect, x).float()
    orig = [lin.weight.clone() for lin in linears]
    best, best_s = float("inf"), torch.ones(K, device=x.device)
    for r in range(N_GRID):
        ratio = r / N_GRID
        s = (x_mean.pow(ratio) / w_mean.pow(1 - ratio).clamp_min(1e-4)).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for lin, w in zip(linears, orig):
            lin.weight.copy_((qdq(w.float() * s) / s).to(w.dtype))
        loss = (_batched(inspect, x).float() - ref).pow(2).mean().item()
        if loss < best:
            best, best_s = loss, s.clone()
    for lin, w in zip(linears, orig):
        lin.weight.copy_(w)
    return best_s


def _clip(lin: nn.Linear, x: Tensor, qdq, group_size: int) -> None:
    """Clamp each (row, group) of lin.weight to the max|w| that minimizes its output error."""
    W = lin.weight.float()
    N, K = W.shape
    G = K if group_size in (-1, 0) else group_size
    xt = x.reshape(-1, K).float()
    step = max(1, xt.shape[0] // CLIP_TOKENS)
    xt = xt[::step][:CLIP_TOKENS].reshape(1, -1, K // G, G)  # (1, n, ng, G)
    best_max = torch.empty(N, K // G, 1, device=W.device)
    rows = max(1, (1 << 24) // (xt.numel()))
    for r0 in range(0, N, rows):
        w = W[r0 : r0 + rows].reshape(-1, 1, K // G, G)  # (b, 1, ng, G)
        org_max = w.abs().amax(-1, keepdim=True)  # (b, 1, ng, 1)
        ref = (xt * w).sum(-1)  # (b, n, ng)
        best_err = torch.full(org_max.shape[:1] + org_max.shape[2:3], float("inf"),
                              device=W.device)  # fmt: skip
        best = org_max.clone()
        for i in range(int(MAX_SHRINK * N_GRID)):
            mx = org_max * (1 - i / N_GRID)
            cw = torch.clamp(w, -mx, mx)
            qw = qdq(cw.reshape(-1, K)).reshape(cw.shape)
            err = ((xt * qw).sum(-1) - ref).pow(2).mean(1)  # (b, ng)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[:, None, :, None], mx, best)
        best_max[r0 : r0 + rows] = best[:, 0]
    clipped = torch.clamp(W.reshape(N, K // G, G), -best_max, best_max).reshape(N, K)
    lin.weight.copy_(clipped.to(lin.weight.dtype))
