"""ModelRunner: owns the device — builds and loads the model, sizes the KV cache, runs forwards.

Fixed order: build → load → warm up → measure memory → size the KV cache → capture CUDA graphs.

Decode steps (one new token per sequence, logits for each) replay a CUDA graph captured for the
smallest batch-size bucket that holds the batch. The graph reads static buffers — token ids,
positions, slots, block tables, lengths — that each step fills in place; padding rows get slot -1
(nothing written) and length 0 (attention output 0), and their logits are dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from lowbit.config import DTYPES, EngineArgs, ModelConfig
from lowbit.engine.kv_scales import (
    CALIBRATION_MAX_TOKENS,
    CALIBRATION_TEXT,
    kv_amax,
    resolve_kv_scales,
)
from lowbit.engine.tokenizer import load_tokenizer
from lowbit.kernels import dispatch
from lowbit.layers.attention import (
    AttentionMetadata,
    BlockTableRows,
    KVCache,
    build_metadata,
    kernel_slots,
)
from lowbit.layers.linear import LinearBase
from lowbit.loader.loader import build_model, init_dummy_weights, load_checkpoint
from lowbit.quant.spec import QuantPlan

logger = logging.getLogger(__name__)

_KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# CPU has no allocator to measure: a fixed default capacity, capped by bytes.
_CPU_KV_TOKENS = 65536
_CPU_KV_BYTES = 4 << 30
# Decode batch sizes that get a CUDA graph; a batch replays the smallest bucket that holds it.
GRAPH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def pick_device(device: str | None) -> torch.device:
    """The requested device, or CUDA when present, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu'")
    return dev


def default_batched_tokens(device: torch.device) -> int:
    """Tokens a forward pass may hold when not set: as SGLang sizes its chunked prefill, by the
    GPU's memory (2048 under 35 GiB, 4096 under 60, else 8192; 2048 on CPU). A budget smaller
    than a batch's prompts prefills them over several steps, interleaved with the decodes of
    those admitted first, so the batch decodes out of step: a batch of 64 prompts of 128 tokens
    with 2048 took 37 forward passes for 33 tokens each (3 mixed, 4 tail steps of 48 / 33 / 17 /
    1 sequences) where 8192 takes 33 (benchmarks/RESULTS.md run 13)."""
    if device.type != "cuda":
        return 2048
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return 2048 if gib < 35 else 4096 if gib < 60 else 8192


def pick_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto' → the checkpoint's dtype, except float32 on CUDA, which runs in bfloat16."""
    if name != "auto":
        return DTYPES[name]
    if cfg.torch_dtype == torch.float32 and device.type == "cuda":
        return torch.bfloat16
    return cfg.torch_dtype


def graph_unsafe(model: nn.Module) -> str | None:
    """The first linear scheme that declares itself not CUDA-graph safe, described, or None."""
    for module in model.modules():
        if isinstance(module, LinearBase) and not getattr(module.scheme, "cuda_graph_safe", True):
            return module.scheme.describe()
    return None


class ModelRunner:
    """Runs batches of (sequence, new tokens) through the model over a paged KV cache."""

    def __init__(
        self, args: EngineArgs, cfg: ModelConfig, plan: QuantPlan, model_dir: Path, tokenizer=None
    ):
        self.args, self.cfg = args, cfg
        self.tokenizer = tokenizer  # the engine's; read from model_dir only if calibration needs it
        self.device = pick_device(args.device)
        # tokens a forward pass may hold (the scheduler's budget, the warm-up's prefill)
        self.batched_tokens = args.max_num_batched_tokens or default_batched_tokens(self.device)
        self.dtype = pick_dtype(args.dtype, cfg, self.device)
        self.block_size = args.block_size
        torch.manual_seed(args.seed)
        if self.device.type == "cuda":  # KV sizing reads the peak of this engine's load only
            torch.cuda.reset_peak_memory_stats(self.device)
        plan.prepare(self.device, self.dtype)  # online methods quantize on this device
        self.model = build_model(cfg, plan, self.dtype, self.device)
        if args.load_format == "dummy":
            init_dummy_weights(self.model, plan, args.seed)
        else:
            load_checkpoint(self.model, model_dir, plan, args.show_progress)
        self.generator = torch.Generator(device=self.device).manual_seed(args.seed)
        # Empty until captured: the KV-sizing warm-up below runs eagerly.
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        # Fixed here, before any cache exists and before graph capture: graphs hold these floats.
        self.kv_scales = self._kv_scales(plan, model_dir)
        self.num_blocks = self._size_kv_cache()
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        if self.device.type == "cuda" and not args.disable_cuda_graph:
            unsafe = graph_unsafe(self.model)
            if unsafe:
                logger.warning(
                    "CUDA graphs are off: %s cannot be captured; running eagerly", unsafe
                )
            elif dispatch.use_triton(self.device):
                self._capture_or_eager()
            else:
                logger.warning("CUDA graphs need Triton's attention kernels; running eagerly")

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
        # the peak below is this engine's: weights, activations and whatever else is alive now,
        # not an earlier engine's KV cache in the same process
        torch.cuda.reset_peak_memory_stats(self.device)
        self._warmup()
        free, total = torch.cuda.mem_get_info(self.device)
        # memory this process's allocator holds (reserved) is ours to reuse, cached blocks of
        # earlier, released models included; the rest of what is not free is another's
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        budget = total * self.args.mem_fraction_static - peak - used_by_others
        blocks = int(budget // per_block)
        if blocks <= 0:
            raise RuntimeError(
                f"no GPU memory left for the KV cache (weights and activations take "
                f"{peak / 2**30:.1f} GiB and other processes {used_by_others / 2**30:.1f} GiB of "
                f"{total / 2**30:.1f} GiB); raise --mem-fraction-static or use a smaller or more "
                f"quantized model"
            )
        return blocks

    def _warmup(self) -> None:
        """One full-budget prefill on a scratch cache, so peak activation memory is measured."""
        n = min(self.batched_tokens, self.cfg.max_position_embeddings)
        blocks = -(-n // self.block_size)
        caches = self._allocate_kv_cache(blocks)
        table = list(range(blocks))
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        self.forward(ids, [n], [n], [table], caches, logits_at=[n - 1])
        del caches
        torch.cuda.synchronize(self.device)

    def _allocate_kv_cache(
        self, num_blocks: int, dtype: torch.dtype | None = None
    ) -> list[KVCache]:
        """One (slots, Hkv, D) k and v tensor per layer with the layer's scales (fp8 only)."""
        dtype = dtype or self.kv_dtype
        shape = (num_blocks * self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim)
        scales = self.kv_scales if dtype.itemsize == 1 else [(1.0, 1.0)] * self.cfg.num_layers
        return [
            KVCache(
                torch.zeros(shape, dtype=dtype, device=self.device),
                torch.zeros(shape, dtype=dtype, device=self.device),
                k_scale,
                v_scale,
            )
            for k_scale, v_scale in scales
        ]

    def _kv_scales(self, plan: QuantPlan, model_dir: Path) -> list[tuple[float, float]]:
        """Per-layer (k_scale, v_scale): the checkpoint's, else calibrated (engine/kv_scales.py)."""
        return resolve_kv_scales(
            self.kv_dtype,
            self.args.kv_cache_dtype,
            plan.kv_scales,
            self.cfg.num_layers,
            lambda: self._calibration_amax(model_dir),
        )

    def _calibration_amax(self, model_dir: Path) -> dict[int, tuple[float, float]]:
        """Max |k|, |v| per layer over one prefill of the calibration text (compute-dtype cache)."""
        tokenizer = self.tokenizer or load_tokenizer(model_dir)
        ids = tokenizer(CALIBRATION_TEXT)["input_ids"]
        n = min(len(ids), CALIBRATION_MAX_TOKENS, self.cfg.max_position_embeddings)
        blocks = -(-n // self.block_size)
        caches = self._allocate_kv_cache(blocks, self.dtype)
        with kv_amax(self.model) as amax:
            ids_t = torch.tensor(ids[:n], dtype=torch.long, device=self.device)
            self.forward(ids_t, [n], [n], [list(range(blocks))], caches, logits_at=[n - 1])
        return {layer: tuple(a.tolist()) for layer, a in amax.items()}

    # ---- CUDA graphs for decode ----

    def _capture_or_eager(self) -> None:
        """Capture decode graphs; a scheme whose kernels refuse capture leaves decode eager."""
        try:
            self._capture_graphs()
        except RuntimeError as e:  # torch raises RuntimeError for ops illegal under capture
            self.graphs.clear()
            torch.cuda.synchronize(self.device)
            logger.warning("CUDA graph capture failed (%s); decode runs eagerly", e)

    def _capture_graphs(self) -> None:
        """Allocate the static decode buffers and capture one graph per batch-size bucket."""
        buckets = [b for b in GRAPH_BUCKETS if b <= self.args.max_running_requests]
        if self.args.max_running_requests not in buckets and self.args.max_running_requests < 256:
            buckets.append(self.args.max_running_requests)
        max_b = buckets[-1]
        ctx = min(self.cfg.max_position_embeddings, self.num_blocks * self.block_size)
        dev = self.device
        self._g_ids = torch.zeros(max_b, dtype=torch.long, device=dev)
        self._g_pos = torch.zeros(max_b, dtype=torch.long, device=dev)
        self._g_slots = torch.full((max_b,), -1, dtype=torch.long, device=dev)
        self._g_lens = torch.zeros(max_b, dtype=torch.int32, device=dev)
        self._g_tables = torch.zeros(
            max_b, -(-ctx // self.block_size), dtype=torch.int32, device=dev
        )
        self._table_rows = BlockTableRows(*self._g_tables.shape)
        pool = None
        with torch.inference_mode():
            for b in reversed(buckets):  # largest first, so smaller graphs reuse its memory
                meta = AttentionMetadata(
                    slot_mapping=self._g_slots[:b], max_q=1, block_size=self.block_size,
                    block_tables=self._g_tables[:b], seq_lens=self._g_lens[:b],
                )  # fmt: skip
                self._decode_body(b, meta)  # compiles kernels outside the capture
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._decode_body(b, meta)
                pool = graph.pool()
                self.graphs[b] = (graph, logits)
        torch.cuda.synchronize(dev)
        logger.info("captured decode CUDA graphs for batch sizes %s", buckets)

    def _decode_body(self, b: int, meta: AttentionMetadata) -> Tensor:
        """The captured work: b tokens from the static buffers → float32 logits (b, vocab)."""
        hidden = self.model(self._g_ids[:b], self._g_pos[:b], meta, self.kv_caches)
        return self.model.compute_logits(hidden)

    def _graph_bucket(self, seq_lens, query_lens, caches, logits_at) -> int | None:
        """The bucket whose graph runs this batch, or None to run it eagerly."""
        B = len(seq_lens)
        if not self.graphs or caches is not None or B > max(self.graphs):
            return None
        if any(q != 1 for q in query_lens) or logits_at != list(range(B)):
            return None
        return min(b for b in self.graphs if b >= B)

    def _replay(self, bucket: int, ids: Tensor, seq_lens, block_tables) -> Tensor:
        """Fill the static buffers for B ≤ bucket decoding sequences, replay, return (B, vocab)."""
        B = len(seq_lens)
        slots = kernel_slots(seq_lens, [1] * B, block_tables, self.block_size)
        pad = bucket - B
        # One host→device copy for positions, slots and lengths of all rows, padding included.
        host = torch.tensor(
            [
                [L - 1 for L in seq_lens] + [0] * pad,
                slots + [-1] * pad,
                list(seq_lens) + [0] * pad,
            ],
            dtype=torch.long,
        )
        dev = host.to(self.device, non_blocking=True)
        self._g_pos[:bucket].copy_(dev[0])
        self._g_slots[:bucket].copy_(dev[1])
        self._g_lens[:bucket].copy_(dev[2])
        self._g_ids[:B].copy_(ids)
        tables = self._table_rows.update(block_tables)  # (B, w) int32, rows that changed
        self._g_tables[:B, : tables.shape[1]].copy_(tables, non_blocking=True)
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits[:B]

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
        """Compute `ids` (T,) for B sequences; float32 logits at flat indices `logits_at`.

        Decode batches replay a CUDA graph; their logits are a view valid until the next call.
        """
        bucket = self._graph_bucket(seq_lens, query_lens, caches, logits_at)
        if bucket is not None:
            return self._replay(bucket, ids, seq_lens, block_tables)
        meta = build_metadata(seq_lens, query_lens, block_tables, self.block_size, self.device)
        positions = torch.cat([torch.arange(s - q, s) for s, q in zip(seq_lens, query_lens)]).to(
            self.device
        )
        hidden = self.model(ids, positions, meta, caches or self.kv_caches)  # (T, hidden)
        if logits_at is not None:
            hidden = hidden[torch.tensor(logits_at, device=self.device)]
        return self.model.compute_logits(hidden)  # (N, vocab)
