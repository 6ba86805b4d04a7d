"""`--torchao-config`: SGLang's nine torchao strings, applied by torchao's own `quantize_`.

Each linear layer is quantized as its weights stream in: the shards of a fused layer wait on the
host, the layer's full-precision weight is copied to the device once, handed to torchao, and
freed, so the full-precision model never sits whole on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lowbit.kernels import dispatch
from lowbit.quant.spec import QuantPlan

logger = logging.getLogger(__name__)

INT4_GROUP_SIZES = (32, 64, 128, 256)


def _fp8_capable(device: torch.device) -> bool:
    """fp8 matmuls need Ada/Hopper (SM 8.9+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _make_config(name: str):
    """torchao config object for one of the supported strings (torchao imported lazily)."""
    import torchao.quantization as tq

    if name == "int8dq":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if name == "int8wo":
        return tq.Int8WeightOnlyConfig()
    if name == "fp8wo":
        return tq.Float8WeightOnlyConfig()
    if name.startswith("fp8dq-"):
        gran = tq.PerTensor() if name == "fp8dq-per_tensor" else tq.PerRow()
        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=gran)
    group = int(name.split("-")[1])
    # tinygemm's layout: the packing torchao runs on CUDA without extra packages.
    return tq.Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")


# name → (device check returning why it cannot run here, or None)
_REQUIREMENTS: dict[str, Callable[[torch.device], str | None]] = {
    "int8dq": lambda d: None,
    "int8wo": lambda d: None,
    "fp8wo": lambda d: None if d.type == "cpu" or _fp8_capable(d) else "needs SM 8.9+ GPUs",
    "fp8dq-per_tensor": lambda d: None if _fp8_capable(d) else "needs a CUDA GPU with SM 8.9+",
    "fp8dq-per_row": lambda d: None if _fp8_capable(d) else "needs a CUDA GPU with SM 8.9+",
    **{
        f"int4wo-{g}": (lambda d: None if d.type == "cuda" else "torchao has no int4 CPU kernel")
        for g in INT4_GROUP_SIZES
    },
}
TORCHAO_CONFIGS = tuple(_REQUIREMENTS)
# int8dq's torchao matmul breaks CUDA-graph capture (sglang#2219); on CUDA lowbit multiplies
# torchao's int8 weights with its own kernel instead, which captures (TorchaoScheme._int8dq_cuda).
# fp8dq-per_tensor cannot be replayed faithfully: its one activation scale spans the whole batch,
# padded rows of a graph bucket included, so replay would differ from eager — it runs eagerly,
# saying so at start-up.
NOT_GRAPH_SAFE = frozenset({"fp8dq-per_tensor"})


def check_torchao_config(name: str, device: torch.device) -> None:
    """Fail before loading when the string is unknown or cannot run on this device."""
    if name not in _REQUIREMENTS:
        raise ValueError(f"unknown --torchao-config {name!r}; supported: {list(TORCHAO_CONFIGS)}")
    reason = _REQUIREMENTS[name](device)
    if reason:
        usable = [n for n, req in _REQUIREMENTS.items() if req(device) is None]
        raise ValueError(
            f"--torchao-config {name} cannot run on {device.type} ({reason}); "
            f"on this device use one of {usable}"
        )
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise ValueError(
            "--torchao-config needs the torchao package: pip install 'lowbit[torchao]'"
        ) from e


class TorchaoScheme:
    """A linear whose full-precision weight is handed to torchao's `quantize_` once loaded."""

    def __init__(self, name: str):
        self.name = name
        self.cuda_graph_safe = name not in NOT_GRAPH_SAFE

    def create_weights(self, layer) -> None:
        """A meta-device `weight` (no memory) whose loader stages shards on the real device."""
        device = torch.get_default_device()
        self._staged: dict[int, Tensor] = {}
        self._device = device

        def load(param, tensor, shard_id=None):
            self._load(layer, param, tensor, shard_id)

        meta = torch.empty(
            layer.output_size, layer.input_size, dtype=layer.params_dtype, device="meta"
        )
        layer.add_param("weight", meta, output_dim=0, input_dim=1, weight_loader=load)
        layer.torchao_linear = None

    def _load(self, layer, param, tensor: Tensor, shard_id) -> None:
        """Stage one shard; when the layer is complete, quantize it and drop the staging."""
        whole = shard_id is None
        i = 0 if whole else layer.shard_index(shard_id)
        rows = layer.output_size if whole else layer.output_sizes[i]
        if tuple(tensor.shape) != (rows, layer.input_size):
            raise ValueError(
                f"shape mismatch: expected {(rows, layer.input_size)}, checkpoint has "
                f"{tuple(tensor.shape)}"
            )
        self._staged[i] = tensor  # shards wait on the host: one device copy of the fused weight
        if whole or len(self._staged) == len(layer.shard_names):
            parts = [self._staged[k] for k in sorted(self._staged)]
            self._staged.clear()
            weight = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(
                self._device, layer.params_dtype
            )  # (out, in)
            del parts
            layer.torchao_linear = self._quantize(layer, weight)

    def _quantize(self, layer, weight: Tensor) -> nn.Linear:
        """torchao's quantize_ on a bias-free nn.Linear holding `weight`."""
        from torchao.quantization import quantize_

        lin = nn.Linear(layer.input_size, layer.output_size, bias=False, device="meta")
        lin.weight = nn.Parameter(weight, requires_grad=False)
        quantize_(lin, _make_config(self.name))
        return lin

    def process_weights_after_loading(self, layer) -> None:
        """Drop the meta placeholder; the torchao module holds the weight now."""
        if layer.torchao_linear is None:
            raise ValueError(f"{layer.prefix}: not all shards of the weight were loaded")
        del layer._parameters["weight"]
        w = layer.torchao_linear.weight
        # int8dq on CUDA (see `_int8dq_cuda`): torchao's per-row scale as the kernel's (N,) float32
        layer.int8dq_scale = (
            w.scale.reshape(-1).float() if self.name == "int8dq" and w.is_cuda else None
        )

    def apply(self, layer, x: Tensor, bias: Tensor | None) -> Tensor:
        """torchao's quantized matmul, then the bias (int8dq on CUDA: see `_int8dq_cuda`)."""
        if layer.int8dq_scale is not None:
            return self._int8dq_cuda(layer, x, bias)
        y = layer.torchao_linear(x)
        return y if bias is None else y + bias

    @staticmethod
    def _int8dq_cuda(layer, x: Tensor, bias: Tensor | None) -> Tensor:
        """torchao's int8 weight (qdata, per-row scale) times per-token int8 activations.

        torchao's own int8dq matmul (`safe_int_mm`) formats its input with `repr()`, a device
        sync that CUDA-graph capture forbids (the failure SGLang documents, sglang#2219). The
        weights stay torchao's; the product runs through lowbit's int8 kernel with torchao's
        activation convention (symmetric per token, amax / 127.5, codes in [-128, 127]).
        """
        w = layer.torchao_linear.weight
        return dispatch.int8_gemm(x, w.qdata, layer.int8dq_scale, None, bias, qmax=127.5)

    def describe(self) -> str:
        """Scheme and kernel for `lowbit inspect`."""
        return f"torchao {self.name} → torchao.quantize_ tensor subclass"


class TorchaoPlan(QuantPlan):
    """Every decoder linear gets `TorchaoScheme`; lm_head stays full precision (as in SGLang).
    Checkpoint tensors pass through unchanged (a full-precision checkpoint)."""

    def __init__(self, name: str):
        super().__init__(method=f"torchao:{name}",
                         description=f"torchao {name} (online, applied while loading)")  # fmt: skip
        self.name = name

    def scheme_for(self, prefix: str, sources: list[str]):
        """TorchaoScheme for decoder linears, unquantized for lm_head."""
        from lowbit.quant.schemes.unquantized import UnquantizedScheme

        scheme = UnquantizedScheme() if prefix == "lm_head" else TorchaoScheme(self.name)
        self.chosen[prefix], self.sources[prefix] = scheme, list(sources)
        return scheme
