"""Linear layers: plain, fused column (gate_up), fused QKV, row.

A layer holds sizes and a scheme; the scheme creates the parameters through `add_param`, and each
parameter carries a `weight_loader(param, tensor, shard_id)` that places a checkpoint tensor (or one
shard of a fused layer) into it. `forward` is `scheme.apply(self, x, bias)`.

Parameter metadata (attributes set by `add_param`):
  output_dim     the param dim that indexes output features (None: not split by output).
                 Its length may be a fraction or multiple of the outputs (packing, group or block
                 scales): a shard's slice is scaled by `param.size(output_dim) / output_size`.
  shard_indexed  leading dim has one entry per shard (per-tensor scales of a fused layer).
  optional       may be absent from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lowbit.quant.scheme import QuantScheme

WeightLoader = Callable[[nn.Parameter, Tensor, "int | str | None"], None]


class LinearBase(nn.Module):
    """A linear layer whose numerics belong to its scheme; outputs may be fused shards."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        *,
        bias: bool,
        params_dtype: torch.dtype,
        prefix: str,
        scheme: QuantScheme,
        shard_names: tuple = (),
    ):
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(output_sizes)
        self.params_dtype = params_dtype
        self.prefix = prefix
        # Names checkpoints use for the fused shards ("q", "k", "v" or 0, 1); () when not fused.
        self.shard_names = tuple(shard_names)
        self.scheme = scheme
        self.loaded: set[tuple[str, object]] = set()
        scheme.create_weights(self)
        if bias:
            self.add_param("bias", torch.empty(self.output_size, dtype=params_dtype), output_dim=0)
        else:
            self.bias = None

    def add_param(
        self,
        name: str,
        data: Tensor,
        *,
        output_dim: int | None = None,
        input_dim: int | None = None,
        shard_indexed: bool = False,
        optional: bool = False,
        weight_loader: WeightLoader | None = None,
    ) -> nn.Parameter:
        """Register a parameter with its loading metadata; schemes call this from create_weights."""
        param = nn.Parameter(data, requires_grad=False)
        param.output_dim = output_dim
        param.input_dim = input_dim
        param.shard_indexed = shard_indexed
        param.optional = optional
        param.weight_loader = weight_loader or self.weight_loader
        self.register_parameter(name, param)
        return param

    def shard_index(self, shard_id) -> int:
        """Position of a checkpoint shard name within the fused output."""
        if shard_id not in self.shard_names:
            raise KeyError(f"{self.prefix}: unknown shard {shard_id!r}; has {self.shard_names}")
        return self.shard_names.index(shard_id)

    def shard_slice(self, param: nn.Parameter, shard_id) -> Tensor:
        """The part of `param`'s data that holds shard `shard_id` (all of it when not fused)."""
        data = param.data
        if shard_id is None:
            return data
        i = self.shard_index(shard_id)
        if param.shard_indexed:
            return data[i]
        if param.output_dim is None:
            return data  # replicated across shards (e.g. g_idx of fused q/k/v)
        rows = data.size(param.output_dim)
        start, size = sum(self.output_sizes[:i]), self.output_sizes[i]
        if (start * rows) % self.output_size or (size * rows) % self.output_size:
            raise ValueError(
                f"{self.prefix}: shard {shard_id!r} ({size} outputs at {start}) does not align "
                f"with a parameter of {rows} rows for {self.output_size} outputs"
            )
        scale = rows / self.output_size
        return data.narrow(param.output_dim, int(start * scale), int(size * scale))

    def weight_loader(self, param: nn.Parameter, loaded: Tensor, shard_id=None) -> None:
        """Copy a checkpoint tensor into its place in `param`, checking the shape."""
        target = self.shard_slice(param, shard_id)
        if param.shard_indexed and loaded.numel() == target.numel():
            loaded = loaded.reshape(target.shape)
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(
                f"shape mismatch: expected {tuple(target.shape)}, checkpoint has "
                f"{tuple(loaded.shape)}"
            )
        target.copy_(loaded)

    def mark_loaded(self, param_name: str, shard_id) -> None:
        """Record that a (param, shard) came from the checkpoint, for the strictness check."""
        self.loaded.add((param_name, shard_id))

    def missing(self) -> list[str]:
        """Names of required (param, shard) pairs that no checkpoint tensor filled."""
        shards = self.shard_names or (None,)
        out = []
        for name, param in self.named_parameters(recurse=False):
            if param.optional:
                continue
            for shard in shards:
                if (name, shard) not in self.loaded:
                    out.append(name if shard is None else f"{name}[{shard}]")
        return out

    def forward(self, x: Tensor) -> Tensor:
        """`x (..., in) → (..., out)` through the scheme (x may be the QuantizedActivation that
        `input_quant` asked the producer for)."""
        return self.scheme.apply(self, x, self.bias)

    def input_quant(self) -> tuple[torch.dtype, float] | None:
        """(dtype, qmax) when the scheme quantizes its input per token dynamically and takes it
        already quantized by the producing kernel (RMSNorm, SwiGLU); None otherwise."""
        fused = getattr(self.scheme, "fused_input_quant", None)
        return fused() if fused is not None else None

    def extra_repr(self) -> str:
        """Sizes and scheme, for printing the model."""
        return f"in={self.input_size}, out={self.output_sizes}, scheme={self.scheme.describe()}"


class ReplicatedLinear(LinearBase):
    """A single linear layer (o_proj, down_proj, lm_head on one device)."""

    def __init__(self, input_size: int, output_size: int, **kw):
        super().__init__(input_size, [output_size], **kw)


class MergedColumnLinear(LinearBase):
    """Several linears of the same input fused along the output (gate_proj + up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], **kw):
        super().__init__(
            input_size, output_sizes, shard_names=tuple(range(len(output_sizes))), **kw
        )


class QKVLinear(LinearBase):
    """q_proj, k_proj and v_proj fused into one output of (H + 2·Hkv)·D."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, **kw):
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden, sizes, shard_names=("q", "k", "v"), **kw)
