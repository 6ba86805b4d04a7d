"""Helpers the runtime schemes share: per-shard scalars, replicated params, swapping params."""

from __future__ import annotations

import torch
from torch import Tensor, nn

TORCH_FLOAT8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def num_shards(layer) -> int:
    """Shards of a fused layer (1 when not fused)."""
    return max(1, len(layer.shard_names))


def add_shard_scalars(layer, name: str, *, optional: bool = False) -> nn.Parameter:
    """A per-tensor scale: one float32 entry per shard, each shard's checkpoint scalar."""
    data = torch.full((num_shards(layer),), float("nan"), dtype=torch.float32)
    return layer.add_param(name, data, shard_indexed=True, optional=optional)


def add_replicated(layer, name: str, data: Tensor, *, optional: bool = False) -> nn.Parameter:
    """A param every shard of a fused layer carries identically (g_idx); a mismatch is an error."""
    seen: set = set()

    def load(param: nn.Parameter, loaded: Tensor, shard_id=None) -> None:
        if tuple(loaded.shape) != tuple(param.shape):
            raise ValueError(
                f"shape mismatch: expected {tuple(param.shape)}, checkpoint has "
                f"{tuple(loaded.shape)}"
            )
        if seen and not torch.equal(param.data, loaded.to(param.dtype)):
            raise ValueError(
                f"{layer.prefix}.{name} of shard {shard_id!r} differs from the other "
                "shards'; fused shards must share it"
            )
        seen.add(shard_id)
        param.data.copy_(loaded)

    return layer.add_param(name, data, optional=optional, weight_loader=load)


def per_row(values: Tensor, sizes: list[int]) -> Tensor:
    """One value per shard (S,) → one per output row (N,)."""
    return torch.repeat_interleave(values, torch.tensor(sizes, device=values.device))


def swap_params(layer, drop: list[str], **new: Tensor | None) -> None:
    """Replace loaded checkpoint-layout params by the kernel layout (None: attribute None)."""
    for name in drop:
        if name in layer._parameters:
            delattr(layer, name)
    for name, value in new.items():
        if value is None:
            setattr(layer, name, None)
        else:
            layer.register_parameter(name, nn.Parameter(value, requires_grad=False))


def loaded_scalars(layer, name: str) -> Tensor:
    """A per-shard scalar param, checked to be filled for every shard."""
    v = getattr(layer, name).data
    if torch.isnan(v).any():
        raise ValueError(f"{layer.prefix}.{name}: some shards have no value in the checkpoint")
    return v
