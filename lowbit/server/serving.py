"""What every generation route shares: validation against the engine, collecting, streaming."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response, StreamingResponse

from lowbit.engine.request import SamplingParams, StreamDelta
from lowbit.engine.tokenizer import chat_ids
from lowbit.server.engine_loop import EngineLoop, Subscription
from lowbit.server.engine_process import EngineProcess
from lowbit.server.errors import APIError, bad_request, invalid
from lowbit.server.metrics import Metrics

T = TypeVar("T", bound=BaseModel)
MAX_BODY_BYTES = 32 << 20  # far above any prompt that fits a context; stops memory abuse
_COMPACT = (",", ":")  # JSON separators without spaces: smaller events


@dataclass
class ServerState:
    """The engine process, its loop and the server's settings, shared by all routes."""

    engine: EngineProcess
    loop: EngineLoop
    metrics: Metrics
    model_name: str
    chat_template: str | None = None
    api_key: str | None = None

    def check_model(self, name: str) -> None:
        """404 unless `name` is the served model."""
        if name != self.model_name:
            raise APIError(
                404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model", code="model_not_found",
            )  # fmt: skip

    def encode(self, prompt: str | list[int], param: str) -> list[int]:
        """Prompt token ids, validated (vocabulary, context length) or a 400 naming `param`."""
        try:
            return self.engine.encode(prompt)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param=param) from e

    def chat_prompt(self, messages: list[dict], template: str | None) -> list[int]:
        """Token ids of chat messages under the request's, the server's or the model's template."""
        try:
            ids = chat_ids(self.engine.tokenizer, messages, template or self.chat_template)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        except Exception as e:  # jinja2 raises its own errors for a template that fails
            raise APIError(
                400, f"the chat template failed on these messages: {type(e).__name__}: {e}",
                param="messages",
            ) from e  # fmt: skip
        return self.encode(ids, "messages")

    def max_tokens(self, prompt_len: int, asked: int | None, param: str, default: int | None):
        """Tokens to generate: what was asked (400 if it overflows the context) or the default."""
        room = self.engine.context_length - prompt_len
        if asked is None:
            return room if default is None else min(default, room)
        if asked > room:
            ctx = self.engine.context_length
            raise APIError(
                400,
                f"this model's maximum context length is {ctx} tokens, but {prompt_len + asked} "
                f"were requested ({prompt_len} in the prompt, {asked} to generate); reduce the "
                f"prompt or {param}",
                param=param,
            )
        return asked

    @staticmethod
    def params(fields: dict | None) -> SamplingParams:
        """SamplingParams, or a 400 naming the bad field."""
        try:
            return SamplingParams.from_any(fields)
        except (ValueError, TypeError) as e:
            raise bad_request(e) from e

    @functools.cached_property
    def token_text(self) -> Callable[[int], str]:
        """The text of one token id (cached: the vocabulary never changes)."""
        tok = self.engine.tokenizer
        return functools.lru_cache(maxsize=1 << 16)(lambda t: tok.decode([t]))


async def parse_body(request: Request, model: type[T]) -> T:
    """The JSON body as `model` (whatever the Content-Type says, as curl -d sends a form type)."""
    size = request.headers.get("content-length", "0")
    if size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body has {size} bytes; the limit is {MAX_BODY_BYTES}")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body has {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    if not raw.strip():
        raise APIError(400, "the request has no body; send a JSON object")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from e
    if not isinstance(data, dict):
        raise APIError(400, f"the request body is a JSON {type(data).__name__}; send an object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid(e.errors()) from e


def state_of(request: Request) -> ServerState:
    """The app's ServerState."""
    return request.app.state.server


@dataclass
class Sample:
    """One finished sample, collected from its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def _watch_disconnect(request: Request, sub: Subscription) -> None:
    """Abort the subscription's requests when the client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            sub.abort()
            return


async def collect(request: Request, sub: Subscription) -> dict[tuple[str, int], Sample]:
    """Wait for every sample of the subscription; a client that leaves aborts them."""
    samples: dict[tuple[str, int], Sample] = {}
    watcher = asyncio.create_task(_watch_disconnect(request, sub))
    try:
        async for d in sub:
            s = samples.setdefault((d.request_id, d.index), Sample())
            s.text += d.text
            s.token_ids += d.token_ids
            s.logprobs += d.logprobs or []
            s.finish_reason = d.finish_reason
            s.prompt_tokens, s.completion_tokens = d.prompt_tokens, d.completion_tokens
    finally:
        watcher.cancel()
        sub.abort()
    return samples


class _SSEResponse(StreamingResponse):
    """A streaming response that always closes its generator, so `finally` blocks run now."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


async def stream(
    sub: Subscription, render: Callable[[AsyncIterator[StreamDelta]], AsyncIterator[str]]
) -> Response:
    """Server-sent events of `render(deltas)`, ending in `data: [DONE]`.

    Waits for the first delta so that a request failing at once still gets a JSON error and its
    status code rather than a 200 stream.
    """
    it = aiter(sub)
    try:
        first = await anext(it)
    except APIError as e:
        sub.abort()
        return e.response()
    except StopAsyncIteration:
        first = None

    async def deltas() -> AsyncIterator[StreamDelta]:
        if first is not None:
            yield first
            async for d in it:
                yield d

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in render(deltas()):
                yield f"data: {json.dumps(chunk, ensure_ascii=False, separators=_COMPACT)}\n\n"
        except APIError as e:
            yield e.sse()
        finally:
            sub.abort()
        yield "data: [DONE]\n\n"

    return _SSEResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
