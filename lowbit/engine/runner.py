"""ModelRunner: owns the device — builds and loads the model, sizes the KV cache, runs forwards.

Fixed order: build → load → warm up → measure memory → size the KV cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from lowbit.config import DTYPES, EngineArgs, ModelConfig
from lowbit.layers.attention import KVCache, build_metadata
from lowbit.loader.loader import build_model, init_dummy_weights, load_checkpoint
from lowbit.quant.spec import QuantPlan

logger = logging.getLogger(__name__)

_KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# CPU has no allocator to measure: a fixed default capacity, capped by bytes.
_CPU_KV_TOKENS = 65536
_CPU_KV_BYTES = 4 << 30


def pick_device(device: str | None) -> torch.device:
    """The requested device, or CUDA when present, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu'")
    return dev


def pick_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto' → the checkpoint's dtype, except float32 on CUDA, which runs in bfloat16."""
    if name != "auto":
        return DTYPES[name]
    if cfg.torch_dtype == torch.float32 and device.type == "cuda":
        return torch.bfloat16
    return cfg.torch_dtype


class ModelRunner:
    """Runs batches of (sequence, new tokens) through the model over a paged KV cache."""

    def __init__(self, args: EngineArgs, cfg: ModelConfig, plan: QuantPlan, model_dir: Path):
        self.args, self.cfg = args, cfg
        self.device = pick_device(args.device)
        self.dtype = pick_dtype(args.dtype, cfg, self.device)
        self.block_size = args.block_size
        torch.manual_seed(args.seed)
        self.model = build_model(cfg, plan, self.dtype, self.device)
        if args.load_format == "dummy":
            init_dummy_weights(self.model, plan, args.seed)
        else:
            load_checkpoint(self.model, model_dir, plan, args.show_progress)
        self.generator = torch.Generator(device=self.device).manual_seed(args.seed)
        self.num_blocks = self._size_kv_cache()
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)

    def _kv_bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        cfg = self.cfg
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.kv_dtype.itemsize

    @property
    def kv_dtype(self) -> torch.dtype:
        """Storage dtype of the KV cache."""
        name = self.args.kv_cache_dtype
        if name == "auto":
            return self.dtype
        return _KV_DTYPES.get(name) or DTYPES[name]

    def _size_kv_cache(self) -> int:
        """Number of KV blocks: requested, else what fits in the memory budget."""
        per_block = self._kv_bytes_per_token() * self.block_size
        if self.args.max_total_tokens is not None:
            return self.args.max_total_tokens // self.block_size
        if self.device.type == "cpu":
            tokens = min(_CPU_KV_TOKENS, _CPU_KV_BYTES // self._kv_bytes_per_token())
            return max(tokens // self.block_size, 1)
        self._warmup()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_allocated(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        budget = total * self.args.mem_fraction_static - peak - used_by_others
        blocks = int(budget // per_block)
        if blocks <= 0:
            raise RuntimeError(
                f"no GPU memory left for the KV cache (weights and activations take "
                f"{peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB); raise --mem-fraction-static "
                f"or use a smaller or more quantized model"
            )
        return blocks

    def _warmup(self) -> None:
        """One full-budget prefill on a scratch cache, so peak activation memory is measured."""
        n = min(self.args.max_num_batched_tokens, self.cfg.max_position_embeddings)
        blocks = -(-n // self.block_size)
        caches = self._allocate_kv_cache(blocks)
        table = list(range(blocks))
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        self.forward(ids, [n], [n], [table], caches, logits_at=[n - 1])
        del caches
        torch.cuda.synchronize(self.device)

    def _allocate_kv_cache(self, num_blocks: int) -> list[KVCache]:
        """One (slots, Hkv, D) k and v tensor per layer."""
        shape = (num_blocks * self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim)
        return [
            KVCache(
                torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
            )
            for _ in range(self.cfg.num_layers)
        ]

    @torch.inference_mode()
    def forward(
        self,
        ids: Tensor,
        seq_lens: list[int],
        query_lens: list[int],
        block_tables: list[list[int]],
        caches: list[KVCache] | None = None,
        logits_at: list[int] | None = None,
    ) -> Tensor:
        """Compute `ids` (T,) for B sequences; float32 logits at flat indices `logits_at`."""
        meta = build_metadata(seq_lens, query_lens, block_tables, self.block_size, self.device)
        positions = torch.cat([torch.arange(s - q, s) for s, q in zip(seq_lens, query_lens)]).to(
            self.device
        )
        hidden = self.model(ids, positions, meta, caches or self.kv_caches)  # (T, hidden)
        if logits_at is not None:
            hidden = hidden[torch.tensor(logits_at, device=self.device)]
        return self.model.compute_logits(hidden)  # (N, vocab)
