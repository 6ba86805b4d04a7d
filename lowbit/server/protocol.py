"""Request bodies of the OpenAI routes and of SGLang's native /generate, as pydantic models.

Unknown fields are refused (as OpenAI does) so that a misspelt parameter is an error, not a
silently ignored wish. Ranges are checked here so the error names the OpenAI field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from lowbit.server.errors import APIError

Prob = Annotated[float, Field(gt=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
TokenIds = list[Annotated[StrictInt, Field(ge=0)]]
Stop = str | list[str] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    """`stream_options` of OpenAI's API."""

    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class _Sampling(_Strict):
    """Fields shared by completions and chat: OpenAI's, plus the extras vLLM and SGLang accept."""

    model: str
    n: StrictInt = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: Prob = 1.0
    top_k: StrictInt = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: float = Field(1.0, gt=0)
    seed: StrictInt | None = None
    stop: Stop = None
    stop_token_ids: TokenIds | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by lowbit; remove it", "logit_bias")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise APIError(400, f"stop has {len(self.stop)} strings; give at most 16", "stop")
        if self.stop_token_ids is not None and not self.stop_token_ids:
            self.stop_token_ids = None
        return self

    def sampling(self, max_tokens: int, logprobs: int | None) -> dict:
        """The engine's sampling parameters for this request."""
        return {
            "max_new_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "min_p": self.min_p, "seed": self.seed,
            "repetition_penalty": self.repetition_penalty,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty, "stop": self.stop,
            "stop_token_ids": self.stop_token_ids, "ignore_eos": self.ignore_eos, "n": self.n,
            "logprobs": logprobs, "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
        }  # fmt: skip


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = Field(16, ge=1)
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported; drop best_of", "best_of")
        if self.suffix:
            raise APIError(400, "suffix is not supported by lowbit; remove it", "suffix")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty; give a string or token ids", "prompt")
        return list(p)


class TextPart(_Strict):
    """A text part of a chat message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; unknown keys (tool_calls…) are kept for the template."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template expects it (content as one string)."""
        out = self.model_dump(exclude_none=True)
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        out["content"] = content or ""
        return out


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    chat_template: str | None = None
    add_generation_prompt: StrictBool = True
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict | None = None
    parallel_tool_calls: StrictBool | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        if self.tools or self.tool_choice not in (None, "none"):
            raise APIError(
                400, "tool calling is not supported by lowbit yet; remove tools", "tools"
            )
        if self.response_format and self.response_format.get("type") != "text":
            raise APIError(
                400, "only response_format {'type': 'text'} is supported", "response_format"
            )
        return self

    def num_logprobs(self) -> int | None:
        """Top-k logprobs per token the engine should return (None: none)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class GenerateRequest(_Strict):
    """POST /generate, in SGLang's native shape."""

    text: str | list[str] | None = None
    input_ids: TokenIds | list[TokenIds] | None = None
    sampling_params: dict | list[dict] | None = None
    stream: StrictBool = False
    return_logprob: StrictBool = False
    top_logprobs_num: StrictInt = Field(0, ge=0, le=20)
    rid: str | list[str] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.text is None) == (self.input_ids is None):
            raise APIError(400, "give exactly one of text or input_ids", "text")
        return self

    def prompts(self) -> tuple[list[str | list[int]], bool]:
        """The prompts, and whether the request was a batch (a list of prompts)."""
        p = self.text if self.text is not None else self.input_ids
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p], False
        if not p:
            raise APIError(400, "the prompt list is empty", "text")
        return list(p), True
