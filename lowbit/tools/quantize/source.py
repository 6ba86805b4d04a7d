"""The full-precision source checkpoint as a transformers skeleton on the meta device.

Only one piece (the embeddings, one decoder layer) is materialized on the device at a time, read
tensor by tensor from the safetensors files, so a model larger than device memory calibrates.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from lowbit.loader.weights import safetensors_files

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SourceModel:
    """A meta-device transformers causal LM backed by the checkpoint's safetensors."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.dir = Path(model_dir)
        self.config = AutoConfig.from_pretrained(self.dir)
        raw = json.loads((self.dir / "config.json").read_text())
        if raw.get("quantization_config") is not None:
            method = raw["quantization_config"].get("quant_method", "?")
            raise ValueError(
                f"{self.dir} is already quantized ({method}); lowbit quantize needs a "
                f"full-precision checkpoint"
            )
        self.checkpoint_dtype = _DTYPES.get(str(raw.get("torch_dtype", raw.get("dtype"))),
                                            torch.float32)  # fmt: skip
        self.device = device
        self.dtype = dtype or self.checkpoint_dtype
        self.files = safetensors_files(self.dir)
        self.index: dict[str, Path] = {}
        for f in self.files:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():  # noqa: SIM118 - safe_open has no __iter__
                    self.index[name] = f
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(
                self.config, attn_implementation="sdpa", dtype=self.dtype
            )
        self.model.eval()
        self.layers: nn.ModuleList = self.model.model.layers

    def read(self, name: str) -> Tensor:
        """One checkpoint tensor on the CPU; a clear error when it is missing."""
        if name not in self.index:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.dir}")
        with safe_open(str(self.index[name]), framework="pt") as h:
            return h.get_tensor(name)

    def materialize(self, module: nn.Module, prefix: str) -> nn.Module:
        """Allocate `module` on the device and fill it from the checkpoint tensors at `prefix`."""
        module.to_empty(device=self.device)
        with torch.no_grad():
            for name, t in module.state_dict().items():
                t.copy_(self.read(f"{prefix}.{name}").to(t.dtype))
        return module

    @staticmethod
    def release(module: nn.Module) -> None:
        """Free a materialized module's memory (back to the meta device)."""
        module.to("meta")

    def embed(self, wins: list[list[int]]) -> Tensor:
        """Token windows (S lists of T ids) → input hidden states (S, T, H) on the device."""
        emb = self.materialize(self.model.model.embed_tokens, "model.embed_tokens")
        with torch.no_grad():
            out = emb(torch.tensor(wins, device=self.device))
        self.release(emb)
        return out

    def rotary(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) for positions 0..T-1, batch 1 (broadcast over samples)."""
        rot = self.model.model.rotary_emb
        fresh = type(rot)(config=self.config).to(self.device)
        T = hidden.shape[1]
        pos = torch.arange(T, device=self.device)[None]
        with torch.no_grad():
            return fresh(hidden[:1], pos)

    def layer_prefix(self, i: int) -> str:
        """Checkpoint prefix of decoder layer i."""
        return f"model.layers.{i}"


def linear_modules(layer: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    """Full checkpoint name → nn.Linear inside one decoder layer, in definition order."""
    return {f"{prefix}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


# Linears that share one input and get fused by engines (qkv_proj, gate_up_proj).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_group(name: str, names: list[str]) -> list[str]:
    """Names in `names` fused with `name` (itself included)."""
    parent, leaf = name.rsplit(".", 1)
    for group in FUSED_GROUPS:
        if leaf in group:
            return [f"{parent}.{g}" for g in group if f"{parent}.{g}" in names]
    return [name]
