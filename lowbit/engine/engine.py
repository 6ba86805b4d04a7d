"""`lowbit.Engine`: the public API over the scheduler and the model runner."""

from __future__ import annotations

import gc
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.config import EngineArgs, ModelConfig
from lowbit.engine.kv_cache import BlockAllocator
from lowbit.engine.request import (
    CompletionOutput,
    RequestOutput,
    SamplingParams,
    Sequence,
    StreamDelta,
)
from lowbit.engine.runner import ModelRunner, pick_device
from lowbit.engine.sampler import SampleRow, penalized, sample, sample_on_device
from lowbit.engine.scheduler import Scheduler
from lowbit.engine.tokenizer import Detokenizer, StopChecker, chat_ids, load_tokenizer
from lowbit.loader.weights import resolve_model_path
from lowbit.quant.resolve import CALIBRATED, detect, resolve_plan

logger = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """A step whose tokens are still on the device: the sampled sequences, the tokens, and
    their host copy (pinned, valid once `ready` has happened; no event off CUDA)."""

    seqs: list[Sequence]
    tokens: Tensor
    host: Tensor
    ready: torch.cuda.Event | None


@dataclass
class _SeqState:
    """Per-sequence decoding state the scheduler does not need."""

    detok: Detokenizer
    stop: StopChecker
    generator: torch.Generator | None


class Engine:
    """Loads a model (quantized or not) and generates text from prompts."""

    def __init__(
        self,
        model_path: str | None = None,
        quantization: str | None = None,
        torchao_config: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        kv_cache_dtype: str = "auto",
        load_format: str = "auto",
        context_length: int | None = None,
        **kwargs,
    ):
        self.args = EngineArgs(
            model_path=model_path, quantization=quantization, torchao_config=torchao_config,
            dtype=dtype, device=device, kv_cache_dtype=kv_cache_dtype, load_format=load_format,
            context_length=context_length, **kwargs,
        )  # fmt: skip
        self.model_dir = resolve_model_path(self.args.model_path, self.args.revision)
        self.model_config = cfg = ModelConfig.from_dir(self.model_dir)
        if (quantization or "").lower() in CALIBRATED and detect(self.model_dir, cfg) is None:
            if self.args.quantize_lm_head:  # refused now, not after minutes of calibration
                raise ValueError(f"--quantize-lm-head does not apply to --quantization "
                                 f"{quantization} (its export keeps lm_head full precision); "
                                 f"drop the flag")  # fmt: skip
            self.model_dir = self._calibrate(quantization)
            self.model_config = cfg = ModelConfig.from_dir(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        if torchao_config is not None:
            plan = self._torchao_plan(cfg, torchao_config)
        else:
            plan = resolve_plan(self.model_dir, cfg, quantization, None, self.args.quantize_lm_head)
        self.quant_plan = plan
        self.runner = ModelRunner(self.args, cfg, plan, self.model_dir, self.tokenizer)
        self.allocator = BlockAllocator(self.runner.num_blocks, self.args.block_size)
        self.scheduler = Scheduler(
            self.allocator, self.args.max_running_requests, self.runner.batched_tokens
        )
        self.context_length = self._context_length(cfg)
        self.eos_token_ids = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self._requests: dict[str, list[Sequence]] = {}
        self._pending: list[StreamDelta] = []
        self._in_flight: _InFlight | None = None  # overlap_schedule: a step not yet landed

    def _calibrate(self, quantization: str):
        """GPTQ/AWQ on a full-precision checkpoint: calibrate once into a cached checkpoint."""
        from lowbit.tools.quantize.online import calibrated_checkpoint

        logger.info("--quantization %s on a full-precision checkpoint: calibrating", quantization)
        return calibrated_checkpoint(
            self.model_dir,
            quantization.lower(),
            device=self.args.device,
            progress=self.args.show_progress,
        )

    def _torchao_plan(self, cfg: ModelConfig, name: str):
        """torchao quantizes full-precision checkpoints only, with a string this device can run."""
        from lowbit.quant.torchao import TorchaoPlan, check_torchao_config

        if cfg.quantization_config is not None:
            method = cfg.quantization_config.get("quant_method", "?")
            raise ValueError(
                f"--torchao-config {name} needs a full-precision checkpoint, but "
                f"{self.model_dir} is already quantized ({method}); drop --torchao-config"
            )
        check_torchao_config(name, pick_device(self.args.device))
        return TorchaoPlan(name)

    def _context_length(self, cfg: ModelConfig) -> int:
        """Longest sequence: asked for or the model's, capped by sliding window and KV capacity."""
        ctx = self.args.context_length or cfg.max_position_embeddings
        if ctx > cfg.max_position_embeddings:
            raise ValueError(
                f"context_length={ctx} exceeds the model's max_position_embeddings "
                f"({cfg.max_position_embeddings}); pass a context_length up to that"
            )
        if cfg.sliding_window and ctx > cfg.sliding_window:
            logger.warning("context length capped at the sliding window (%d)", cfg.sliding_window)
            ctx = cfg.sliding_window
        capacity = self.allocator.num_blocks * self.allocator.block_size
        if ctx > capacity:
            logger.warning("context length %d capped at the KV cache capacity %d", ctx, capacity)
            ctx = capacity
        return ctx

    # ---- request life cycle (the server drives these) ----

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt given as text or ids, validated against vocab and context."""
        return encode_prompt(self.tokenizer, self.model_config.vocab_size, self.context_length,
                             prompt)  # fmt: skip

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | dict | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a prompt; its deltas come out of `step()` under the returned request id."""
        params = SamplingParams.from_any(params)
        ids = self.encode(prompt)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id, i, ids, params)
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            detok = Detokenizer(self.tokenizer, ids, params.skip_special_tokens)
            seq.state = _SeqState(
                detok, StopChecker(params.stop, params.include_stop_str_in_output), gen
            )
            seqs.append(seq)
            if params.max_new_tokens == 0:
                self.scheduler.finish(seq, "length")
                self._pending.append(StreamDelta(request_id, i, "", [], "length", None, len(ids)))
            else:
                self.scheduler.add(seq)
        self._requests[request_id] = seqs
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks (unknown ids are ignored)."""
        for seq in self._requests.get(request_id, []):
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
                self._pending.append(
                    StreamDelta(request_id, seq.index, "", [], "abort", None,
                                len(seq.prompt_ids), len(seq.output_ids))
                )  # fmt: skip

    def has_unfinished(self) -> bool:
        """Whether any request is still running or waiting (or has deltas to hand out)."""
        return self.scheduler.has_work() or bool(self._pending) or self._in_flight is not None

    def release(self, request_id: str) -> list[Sequence]:
        """Forget a finished request; returns its sequences."""
        return self._requests.pop(request_id, [])

    def step(self) -> list[StreamDelta]:
        """Run one batch; the deltas of every sequence that produced text or finished.

        With `overlap_schedule`, a batch whose tokens can be sampled without the host stays in
        flight: the next call launches the following decode step for the same sequences from
        those tokens (still on the device) when nothing else needs scheduling, and only then
        waits for them and turns them into deltas, while the GPU computes."""
        out, self._pending = self._pending, []
        prev, self._in_flight = self._in_flight, None
        if prev is not None:
            if self._continues(prev):
                self._in_flight = self._launch_decode(prev.seqs, prev.tokens)
            out += self._land(prev)
            if self._in_flight is not None:
                return out
        batch = self.scheduler.schedule()
        if not batch:
            return out
        ids, seq_lens, query_lens, tables, logits_at = [], [], [], [], []
        sampling = [s.seq for s in batch if s.samples]
        for s in batch:
            seq = s.seq
            ids += seq.token_slice(seq.num_computed, seq.num_computed + s.num_new)
            seq_lens.append(seq.num_computed + s.num_new)
            query_lens.append(s.num_new)
            tables.append(seq.block_table)
            if s.samples:
                logits_at.append(len(ids) - 1)
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.runner.device)
        logits = self.runner.forward(ids_t, seq_lens, query_lens, tables, logits_at=logits_at)
        for s in batch:
            s.seq.num_computed += s.num_new
        if not sampling:
            return out
        if self.args.overlap_schedule and all(self._device_sampled(q) for q in sampling):
            self._in_flight = self._fly(sampling, self._sample_on_device(logits, sampling))
            return out
        tokens, logprobs = sample(logits, _rows(sampling), self.runner.generator)
        for seq, tok, lp in zip(sampling, tokens, logprobs):
            out.append(self._append_token(seq, tok, lp))
        return out

    # ---- overlap_schedule ----

    @staticmethod
    def _device_sampled(seq: Sequence) -> bool:
        """Whether its next token needs nothing of the host (no logprobs to read, no penalties
        over output tokens the host has not seen yet)."""
        return seq.params.logprobs is None and not penalized(seq.params)

    def _fly(self, seqs: list[Sequence], tokens: Tensor) -> _InFlight:
        """Start copying a step's tokens to the host; the step stays in flight."""
        if tokens.device.type != "cuda":
            return _InFlight(seqs, tokens, tokens, None)
        host = tokens.to("cpu", non_blocking=True)  # pinned
        ready = torch.cuda.Event()
        ready.record()
        return _InFlight(seqs, tokens, host, ready)

    def _continues(self, prev: _InFlight) -> bool:
        """Whether the next step is a decode step of exactly prev's sequences, whatever tokens
        they got: none waiting to be admitted, every running one among them, none at its length
        limit after this token, blocks for one more token each."""
        seqs = prev.seqs
        if self.scheduler.waiting or len(seqs) > self.scheduler.max_batched_tokens:
            return False
        if len(seqs) != len(self.scheduler.running):
            return False
        running = {id(s) for s in self.scheduler.running}
        for s in seqs:
            if id(s) not in running:
                return False
            if len(s.output_ids) + 1 >= s.params.max_new_tokens:
                return False
            if s.num_tokens + 1 >= self.context_length:
                return False
        return all(self.scheduler.reserve(s, s.num_computed + 1) for s in seqs)

    def _launch_decode(self, seqs: list[Sequence], ids: Tensor) -> _InFlight:
        """One decode step of `seqs` from their last tokens `ids`, still on the device."""
        B = len(seqs)
        logits = self.runner.forward(
            ids, [s.num_computed + 1 for s in seqs], [1] * B, [s.block_table for s in seqs],
            logits_at=list(range(B)),
        )  # fmt: skip
        for s in seqs:
            s.num_computed += 1
        return self._fly(seqs, self._sample_on_device(logits, seqs))

    def _sample_on_device(self, logits: Tensor, seqs: list[Sequence]) -> Tensor:
        """`sample_on_device` for these sequences' rows of logits."""
        return sample_on_device(logits, _rows(seqs), self.runner.generator)

    def _land(self, prev: _InFlight) -> list[StreamDelta]:
        """Wait for an in-flight step's tokens and record them (sequences that finished or
        were aborted meanwhile drop theirs)."""
        if prev.ready is not None:
            prev.ready.synchronize()
        return [
            self._append_token(seq, tok, None)
            for seq, tok in zip(prev.seqs, prev.host.tolist())
            if not seq.finished
        ]

    def _drain(self) -> None:
        """Land the step in flight, if any, into the pending deltas."""
        prev, self._in_flight = self._in_flight, None
        if prev is not None:
            self._pending += self._land(prev)

    def _append_token(self, seq: Sequence, tok: int, lp: dict | None) -> StreamDelta:
        """Record a sampled token, detokenize it, and decide whether the sequence stops."""
        p, st = seq.params, seq.state
        seq.output_ids.append(tok)
        if lp is not None:
            seq.logprobs.append(lp)
        reason = None
        if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = "stop"
        elif st.stop.add(st.detok.add(tok)):
            reason = "stop"
        elif len(seq.output_ids) >= p.max_new_tokens or seq.num_tokens >= self.context_length:
            reason = "length"
        if reason:
            self.scheduler.finish(seq, reason)
        return StreamDelta(
            seq.request_id, seq.index, st.stop.emit(final=reason is not None), [tok], reason,
            [lp] if lp is not None else None, len(seq.prompt_ids), len(seq.output_ids),
        )  # fmt: skip

    # ---- offline API ----

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | dict | list | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; returns one RequestOutput per prompt, in order."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        )
        prompt_list = [prompts] if single else list(prompts)
        if not prompt_list:
            raise ValueError("no prompts given")
        params = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params] * len(prompt_list)
        )
        if len(params) != len(prompt_list):
            raise ValueError(f"{len(params)} sampling params for {len(prompt_list)} prompts")
        params = [SamplingParams.from_any(p) for p in params]
        for p in prompt_list:
            self.encode(p)  # validate all before queueing any
        ids = [self.add_request(p, sp) for p, sp in zip(prompt_list, params)]
        while any(not s.finished for rid in ids for s in self._requests[rid]):
            self.step()
        self._drain()  # a step launched before the last tokens ended these requests
        self._pending = [d for d in self._pending if d.request_id not in ids]
        return [
            self._request_output(rid, p if isinstance(p, str) else None)
            for rid, p in zip(ids, prompt_list)
        ]

    def _request_output(self, request_id: str, prompt: str | None) -> RequestOutput:
        """Collect a finished request's samples."""
        seqs = self.release(request_id)
        outputs = [
            CompletionOutput(s.index, s.state.stop.text, list(s.output_ids), s.finish_reason,
                             s.logprobs if s.params.logprobs is not None else None)
            for s in seqs
        ]  # fmt: skip
        return RequestOutput(request_id, prompt, list(seqs[0].prompt_ids), outputs)

    def generate_stream(
        self, prompt: str | list[int], sampling_params: SamplingParams | dict | None = None
    ) -> Iterator[StreamDelta]:
        """Yield deltas of one prompt's samples as they are produced."""
        rid = self.add_request(prompt, sampling_params)
        try:
            remaining = len(self._requests[rid])
            while remaining:
                for d in self.step():
                    if d.request_id == rid:
                        remaining -= d.finished
                        yield d
        finally:
            self.abort(rid)
            self._pending = [d for d in self._pending if d.request_id != rid]
            self.release(rid)

    def chat(
        self, messages: list[dict], sampling_params: SamplingParams | dict | None = None
    ) -> RequestOutput:
        """Generate the assistant's reply to `messages` under the tokenizer's chat template."""
        return self.generate(chat_ids(self.tokenizer, messages), sampling_params)[0]

    @torch.inference_mode()
    def logits(self, token_ids: list[list[int]]) -> Tensor:
        """Teacher-forced logits, float32 (B, T, vocab) on the CPU; shorter rows are zero-padded."""
        if not token_ids or not all(isinstance(r, list) for r in token_ids):
            raise ValueError("token_ids must be a non-empty list of lists of token ids")
        rows = [self.encode(r) for r in token_ids]
        self._drain()
        T = max(len(r) for r in rows)
        out = torch.zeros(len(rows), T, self.model_config.vocab_size)
        for b, row in enumerate(rows):
            n = self.allocator.blocks_for(len(row))
            if n > self.allocator.num_free:
                raise RuntimeError("not enough free KV blocks to score this sequence now")
            blocks = self.allocator.allocate(n)
            try:
                ids = torch.tensor(row, device=self.runner.device)
                logits = self.runner.forward(
                    ids, [len(row)], [len(row)], [blocks], logits_at=list(range(len(row)))
                )
            finally:
                self.allocator.free(blocks)
            out[b, : len(row)] = logits.cpu()
        return out

    def stats(self) -> dict:
        """Queue and KV-cache occupancy, for metrics."""
        used = self.allocator.num_blocks - self.allocator.num_free
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": used,
            "kv_blocks_total": self.allocator.num_blocks,
            "kv_usage": used / self.allocator.num_blocks,
            "preemptions": self.scheduler.num_preemptions,
        }

    def shutdown(self) -> None:
        """Drop all requests and release the model and its memory."""
        self._in_flight = None
        for rid in list(self._requests):
            self.abort(rid)
            self.release(rid)
        self._pending = []
        self.runner = None
        gc.collect()  # the model's modules hold reference cycles; free them before the next load
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _rows(seqs: list[Sequence]) -> list[SampleRow]:
    """What the sampler needs of each sequence."""
    return [SampleRow(q.params, q.prompt_ids, q.output_ids, q.state.generator) for q in seqs]


def encode_prompt(tokenizer, vocab: int, context_length: int, prompt: str | list[int]) -> list[int]:
    """Token ids of a prompt given as text or ids, validated against vocab and context (the
    engine's rule, also applied by the server process before a request reaches the engine)."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty; give at least one character or token id")
        ids = tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        raise TypeError(f"a prompt is a str or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise ValueError("prompt is empty; give at least one character or token id")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    if len(ids) >= context_length:
        raise ValueError(
            f"prompt has {len(ids)} tokens but the context length is {context_length}; "
            f"shorten the prompt (at least one token must be left to generate)"
        )
    return ids
