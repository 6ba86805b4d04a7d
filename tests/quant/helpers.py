"""Build one (possibly fused) linear layer from specs and feed it checkpoint tensors, as the
loader does: route each tensor to its param's weight_loader, mark it, then repack."""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.layers.linear import MergedColumnLinear, ReplicatedLinear
from lowbit.quant.spec import QuantPlan, QuantSpec


def build(specs: list[QuantSpec | None], sizes: list[int], K: int, bias: bool = False):
    """A layer whose shard i (checkpoint module `m.p{i}`) has spec specs[i]; plan included."""
    names = {f"m.p{i}": s for i, s in enumerate(specs)}
    plan = QuantPlan(spec_of=names.get)
    sources = list(names)
    kw = dict(bias=bias, params_dtype=torch.float32, prefix="m.fused")
    if len(sizes) == 1:
        layer = ReplicatedLinear(K, sizes[0], scheme=plan.scheme_for("m.fused", sources), **kw)
    else:
        layer = MergedColumnLinear(K, sizes, scheme=plan.scheme_for("m.fused", sources), **kw)
    return layer, plan


def load(layer, plan: QuantPlan, shards: list[dict[str, Tensor]]) -> None:
    """Load shard i's tensors (checkpoint names `m.p{i}.<param>`), then process."""
    fused = len(shards) > 1
    for i, tensors in enumerate(shards):
        for raw, t in tensors.items():
            for name, tensor in plan.transform(f"m.p{i}.{raw}", t):
                pname = name.rsplit(".", 1)[1]
                param = getattr(layer, pname)
                shard = i if fused else None
                if fused:
                    param.weight_loader(param, tensor, shard)
                else:
                    param.weight_loader(param, tensor)
                layer.mark_loaded(pname, shard)
    missing = layer.missing()
    if missing:
        raise ValueError(f"checkpoint is missing tensors for: {missing}")
    layer.scheme.process_weights_after_loading(layer)


def rel(a: Tensor, b: Tensor) -> float:
    """Relative Frobenius error of a against b."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def sqnr(a: Tensor, ref: Tensor) -> float:
    """Signal-to-quantization-noise ratio of a against ref, in dB."""
    return float(20 * torch.log10(ref.double().norm() / (a.double() - ref.double()).norm()))
