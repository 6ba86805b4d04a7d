"""Frozen configuration: every engine flag (EngineArgs) and the model's shape (ModelConfig).

HF `config.json` keys are read here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2", "bfloat16", "float16", "float32")
LOAD_FORMATS = ("auto", "safetensors", "dummy")

# When config.json has no "architectures" (a bare config), the model_type names the class.
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


QUANT_HELP = (
    "default: detected from the checkpoint. On a full-precision checkpoint, quantize while "
    "loading: fp8, w8a8_fp8, w8a8_int8, w4a16, bitsandbytes (or gptq / awq: calibrated once, "
    "cached). On a quantized one: its method or a compatible override (e.g. w8a8_fp8)"
)
LM_HEAD_HELP = "with an online --quantization: quantize lm_head too"
TORCHAO_HELP = (
    "torchao online quantization: int8dq, int8wo, fp8wo, fp8dq-per_tensor, fp8dq-per_row, "
    "int4wo-32/64/128/256"
)


@dataclass(frozen=True)
class EngineArgs:
    """Every engine option; the CLI, the server and `lowbit.Engine` all build one of these."""

    model_path: str | None = None
    quantization: str | None = None
    torchao_config: str | None = None
    dtype: str = "auto"
    device: str | None = None
    kv_cache_dtype: str = "auto"
    load_format: str = "auto"
    context_length: int | None = None
    seed: int = 0
    # Capacity of the paged KV cache in tokens; None sizes it from memory (CUDA) or a default (CPU).
    max_total_tokens: int | None = None
    block_size: int = 16
    max_running_requests: int = 256
    # Tokens one forward pass may hold (prefill chunks + decodes); None sizes it by the device
    # (`runner.default_batched_tokens`: 2048 on CPU and GPUs under 35 GiB, 4096 under 60, else
    # 8192).
    max_num_batched_tokens: int | None = None
    mem_fraction_static: float = 0.85
    disable_cuda_graph: bool = False
    # Launch the next decode step before handling this one's tokens on the host (their
    # detokenizing, stop checks and deltas then run while the GPU computes): deltas come one
    # step later, tokens are the same. H100, benchmarks/RESULTS.md run 12: w4a16 through the
    # engine 361 → 398 tok/s at batch 1, 6,263 → 6,818 at batch 64.
    overlap_schedule: bool = True
    tp_size: int = 1
    revision: str | None = None
    show_progress: bool = True
    # Online methods quantize lm_head too (it stays full precision by default, as in SGLang).
    quantize_lm_head: bool = False

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(
                f"dtype={self.dtype!r} is not supported; use 'auto' or one of {sorted(DTYPES)}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; "
                f"use one of {list(KV_CACHE_DTYPES)}"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"load_format={self.load_format!r} is not supported; "
                f"use one of {list(LOAD_FORMATS)}"
            )
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(
                f"device={self.device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'"
            )
        if self.context_length is not None and self.context_length <= 0:
            raise ValueError(f"context_length must be positive, got {self.context_length}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_total_tokens is not None and self.max_total_tokens < self.block_size:
            raise ValueError(
                f"max_total_tokens={self.max_total_tokens} is smaller than one KV block "
                f"({self.block_size} tokens)"
            )
        if self.max_running_requests <= 0:
            raise ValueError(
                f"max_running_requests must be positive, got {self.max_running_requests}"
            )
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}"
            )
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(
                f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}"
            )
        if self.tp_size != 1:
            raise ValueError(
                f"tp_size={self.tp_size}: tensor parallelism is not available yet; use tp_size=1"
            )
        if self.quantize_lm_head and self.quantization is None:
            raise ValueError(
                "quantize_lm_head applies to an online --quantization method (fp8, w8a8_int8, "
                "w4a16, …); give one, or drop --quantize-lm-head"
            )
        if self.quantization is not None and self.torchao_config is not None:
            raise ValueError(
                "quantization and torchao_config were both given; choose one: "
                "--quantization for lowbit's own methods or --torchao-config for torchao's"
            )

    def replace(self, **changes: Any) -> EngineArgs:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only model, read once from its HF config.json."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    hidden_act: str
    torch_dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None
    quantization_config: dict | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_hf(cls, config: dict) -> ModelConfig:
        """Read a HF config.json dict; the only place HF config keys are read."""
        archs = config.get("architectures") or []
        model_type = config.get("model_type", "")
        if archs:
            arch = archs[0]
        elif model_type in _ARCH_BY_MODEL_TYPE:
            arch = _ARCH_BY_MODEL_TYPE[model_type]
        else:
            raise ValueError(
                f"config.json names no architecture (architectures={archs}, "
                f"model_type={model_type!r}); supported: {sorted(_ARCH_BY_MODEL_TYPE.values())}"
            )
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in config:
                raise ValueError(f"config.json has no {key!r}; is this a decoder-only LLM config?")
        num_heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        # transformers 5 writes rope_parameters; older configs use rope_theta + rope_scaling.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        dtype_name = config.get("dtype") or config.get("torch_dtype") or "float32"
        if dtype_name not in DTYPES:
            raise ValueError(f"config.json dtype {dtype_name!r} is not supported")
        # Qwen2 always has q/k/v biases; Llama and Mistral only when attention_bias says so.
        attention_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
        sliding = config.get("sliding_window")
        if model_type == "qwen2" and not config.get("use_sliding_window", False):
            sliding = None
        return cls(
            architecture=arch,
            model_type=model_type,
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config.get("intermediate_size", 4 * hidden),
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or hidden // num_heads,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qk_norm=model_type == "qwen3",
            hidden_act=config.get("hidden_act", "silu"),
            torch_dtype=DTYPES[dtype_name],
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=sliding,
            quantization_config=config.get("quantization_config"),
            raw=config,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Read `model_dir/config.json`."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json; is it a HF model directory?")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf(config)
