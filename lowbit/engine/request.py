"""The typed core: sampling parameters, sequences and the outputs users see."""

from __future__ import annotations

import dataclasses
import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

_FIELD_ALIASES = {"max_tokens": "max_new_tokens", "stop_token_id": "stop_token_ids"}


@dataclass
class SamplingParams:
    """How to sample one request (names follow SGLang's `sampling_params`)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # top-k logprobs per generated token (0: only the sampled one)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check()

    def _check(self) -> None:
        """Reject values no sampler can honour, naming the field and the valid range."""
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
             "max_new_tokens", "an integer ≥ 0"),
            (self.temperature >= 0, "temperature", "≥ 0 (0 means greedy)"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 0),
             "top_k", "-1 (off) or a positive integer"),
            (0 <= self.min_p <= 1, "min_p", "in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "> 0 (1 is off)"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]"),
            (isinstance(self.n, int) and 1 <= self.n <= 128, "n", "an integer in [1, 128]"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "logprobs", "None or an integer in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids", "non-negative integers"),
        ]  # fmt: skip
        for ok, name, valid in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {valid}")

    @classmethod
    def from_any(cls, params: SamplingParams | dict | None) -> SamplingParams:
        """Accept a SamplingParams, a dict of its fields (OpenAI's `max_tokens` too) or None."""
        if params is None:
            return cls()
        if isinstance(params, SamplingParams):
            return params
        if not isinstance(params, dict):
            raise TypeError(f"sampling params must be a dict or SamplingParams, got {type(params)}")
        names = {f.name for f in dataclasses.fields(cls)}
        fixed = {_FIELD_ALIASES.get(k, k): v for k, v in params.items()}
        unknown = sorted(set(fixed) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameters {unknown}; known: {sorted(names)}")
        return cls(**fixed)

    @property
    def greedy(self) -> bool:
        """Temperature 0 picks the most likely token."""
        return self.temperature == 0


class Status(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One sample of one request: its tokens, KV blocks and decoding state."""

    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose k/v are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    state: Any = None  # the engine's per-sequence detokenizer and sampler state

    @property
    def token_ids(self) -> list[int]:
        """Prompt then output."""
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """token_ids[start:stop] without building the whole list (a decode step reads one)."""
        P = len(self.prompt_ids)
        if start >= P:
            return self.output_ids[start - P : stop - P]
        if stop <= P:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[: stop - P]

    @property
    def num_tokens(self) -> int:
        """Prompt plus output length."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        """Whether it stopped (finish_reason says why)."""
        return self.status is Status.FINISHED


@dataclass
class CompletionOutput:
    """One finished sample."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    """The result of one prompt: its samples (`outputs`), and `text` of the first."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True

    @property
    def text(self) -> str:
        """The first sample's text."""
        return self.outputs[0].text


@dataclass
class StreamDelta:
    """What one step added to one sample: text, tokens, logprobs; finish_reason at the end."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def finished(self) -> bool:
        """Whether this is the sample's last delta."""
        return self.finish_reason is not None
