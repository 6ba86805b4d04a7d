"""A fused layer (qkv, gate_up) whose shards have different specs: one scheme per shard.

Each shard's params are registered on the fused layer as `s<i>_<name>` (the plan renames the
checkpoint's tensors accordingly) and are whole-tensor params of that shard; `apply` runs every
shard's scheme and concatenates the outputs along the last dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _ShardView:
    """What a shard's scheme sees as its layer: the shard's sizes, params stored on the parent."""

    def __init__(self, parent, index: int, shard_id):
        self._parent, self._tag, self._shard = parent, f"s{index}_", shard_id
        self.input_size = parent.input_size
        self.output_size = parent.output_sizes[index]
        self.output_sizes = [self.output_size]
        self.params_dtype = parent.params_dtype
        self.prefix = f"{parent.prefix}[{shard_id}]"
        self.shard_names = ()

    def add_param(self, name, data, *, weight_loader=None, optional=False, **meta):
        """Register on the parent as `s<i>_<name>`, loaded whole from this shard's tensor."""
        view = self

        def load(param: nn.Parameter, loaded: Tensor, shard_id=None) -> None:
            if shard_id != view._shard:
                raise ValueError(f"tensor of shard {shard_id!r} routed to shard {view._shard!r}")
            if weight_loader is not None:
                return weight_loader(param, loaded, None)
            if meta.get("shard_indexed") and loaded.numel() == param.numel():
                loaded = loaded.reshape(param.shape)
            if tuple(param.shape) != tuple(loaded.shape):
                raise ValueError(
                    f"shape mismatch: expected {tuple(param.shape)}, checkpoint "
                    f"has {tuple(loaded.shape)}"
                )
            param.data.copy_(loaded)

        param = self._parent.add_param(self._tag + name, data, optional=True, weight_loader=load)
        param.required_for = None if optional else self._shard
        return param

    @property
    def loaded(self) -> set:
        """(name, None) pairs of this shard's params that the checkpoint filled."""
        n = len(self._tag)
        return {(p[n:], None) for p, s in self._parent.loaded if p.startswith(self._tag)}

    def __getattr__(self, name):
        return getattr(self._parent, self._tag + name)

    def __setattr__(self, name, value):
        if name.startswith("_") or name in _PLAIN:
            object.__setattr__(self, name, value)
        elif value is None or isinstance(value, nn.Parameter):
            self._parent.__setattr__(self._tag + name, value)
        else:
            object.__setattr__(self, name, value)

    @property
    def _parameters(self):
        n = len(self._tag)
        return {k[n:]: v for k, v in self._parent._parameters.items() if k.startswith(self._tag)}

    def register_parameter(self, name, param):
        """Register a repacked param on the parent under this shard's prefix."""
        self._parent.register_parameter(self._tag + name, param)

    def __delattr__(self, name):
        delattr(self._parent, self._tag + name)


_PLAIN = {"input_size", "output_size", "output_sizes", "params_dtype", "prefix", "shard_names"}


class PerShardScheme:
    """Run each shard of a fused layer with its own scheme and concatenate."""

    def __init__(self, schemes: list):
        self.schemes = schemes
        self.cuda_graph_safe = all(getattr(s, "cuda_graph_safe", True) for s in schemes)

    def create_weights(self, layer) -> None:
        """Each shard's params under its prefix."""
        self.views = [_ShardView(layer, i, s) for i, s in enumerate(layer.shard_names)]
        for scheme, view in zip(self.schemes, self.views, strict=True):
            scheme.create_weights(view)

    def process_weights_after_loading(self, layer) -> None:
        """Check every shard's required params arrived, then repack each shard."""
        missing = [
            name
            for name, p in layer.named_parameters(recurse=False)
            if getattr(p, "required_for", None) is not None
            and (name, p.required_for) not in layer.loaded
        ]
        if missing:
            raise ValueError(f"checkpoint is missing tensors for: {layer.prefix}: {missing}")
        for scheme, view in zip(self.schemes, self.views, strict=True):
            scheme.process_weights_after_loading(view)

    def apply(self, layer, x: Tensor, bias: Tensor | None) -> Tensor:
        """Concatenate the shards' outputs (bias split by shard)."""
        outs, start = [], 0
        for scheme, view in zip(self.schemes, self.views, strict=True):
            n = view.output_size
            b = None if bias is None else bias[start : start + n]
            outs.append(scheme.apply(view, x, b))
            start += n
        return torch.cat(outs, dim=-1)

    def describe(self) -> str:
        """Each shard's scheme."""
        return "per-shard[" + " | ".join(s.describe() for s in self.schemes) + "]"
