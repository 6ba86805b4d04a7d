"""OpenAI's /v1/completions and /v1/chat/completions, streaming (SSE) and not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from lowbit.engine.request import StreamDelta
from lowbit.server.errors import APIError
from lowbit.server.protocol import ChatCompletionRequest, CompletionRequest
from lowbit.server.serving import ServerState, collect, parse_body, state_of, stream

router = APIRouter()


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of one logprob entry (the engine puts the sampled one first)."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def _completion_logprobs(st: ServerState, entries: list[dict], k: int, offset: int) -> dict:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in entries:
        tok, lp = next(iter(entry.items()))
        text = st.token_text(tok)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({st.token_text(t): v for t, v in _top(entry, k)})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _chat_logprobs(st: ServerState, entries: list[dict], k: int) -> dict:
    """Chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def item(t: int, v: float) -> dict:
        text = st.token_text(t)
        return {"token": text, "logprob": v, "bytes": list(text.encode())}

    content = []
    for entry in entries:
        tok, lp = next(iter(entry.items()))
        content.append({**item(tok, lp), "top_logprobs": [item(t, v) for t, v in _top(entry, k)]})
    return {"content": content}


def _usage(prompt: dict[str, int], completion: dict) -> dict:
    """OpenAI's usage object: prompts counted once each, completions summed over samples."""
    p, c = sum(prompt.values()), sum(completion.values())
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    """Text completions for one prompt or a list (each with `n` samples)."""
    req = await parse_body(request, CompletionRequest)
    st = state_of(request)
    st.check_model(req.model)
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt logprobs) is not supported; drop one")
    prompts = req.prompts()
    ids = [st.encode(p, "prompt") for p in prompts]
    params = [
        st.params(req.sampling(st.max_tokens(len(p), req.max_tokens, "max_tokens", None),
                               req.logprobs))
        for p in ids
    ]  # fmt: skip
    sub = st.loop.subscribe(req.stream)
    order = {sub.add(p, sp): i for i, (p, sp) in enumerate(zip(ids, params))}
    echo = [
        p if isinstance(p, str) else st.engine.tokenizer.decode(i) for p, i in zip(prompts, ids)
    ]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": st.model_name}  # fmt: skip
    k = req.logprobs or 0
    index = lambda d: order[d.request_id] * req.n + d.index

    if req.stream:
        opts = req.stream_options

        async def render(deltas: AsyncIterator[StreamDelta]):
            prompt_tok, done_tok, offsets = {}, {}, {}
            async for d in deltas:
                i = index(d)
                prompt_tok[d.request_id] = d.prompt_tokens
                done_tok[i] = d.completion_tokens
                text = d.text
                if req.echo and i not in offsets:
                    text = echo[order[d.request_id]] + text
                offset = offsets.get(i, len(text) - len(d.text))
                offsets[i] = offset + len(d.text)
                if not (text or d.finished or (req.logprobs is not None and d.logprobs)):
                    continue
                lp = None
                if req.logprobs is not None:
                    lp = _completion_logprobs(st, d.logprobs or [], k, offset)
                choice = {
                    "index": i,
                    "text": text,
                    "logprobs": lp,
                    "finish_reason": d.finish_reason,
                }
                chunk = {**head, "choices": [choice]}
                if opts and opts.include_usage:
                    cont = opts.continuous_usage_stats
                    chunk["usage"] = _usage(prompt_tok, done_tok) if cont else None
                yield chunk
            if opts and opts.include_usage:
                yield {**head, "choices": [], "usage": _usage(prompt_tok, done_tok)}

        return await stream(sub, render)

    samples = await collect(request, sub)
    choices = []
    for (rid, j), s in samples.items():
        i = order[rid] * req.n + j
        prefix = echo[order[rid]] if req.echo else ""
        lp = None
        if req.logprobs is not None:
            lp = _completion_logprobs(st, s.logprobs, k, len(prefix))
        choices.append(
            {"index": i, "text": prefix + s.text, "logprobs": lp, "finish_reason": s.finish_reason}
        )
    choices.sort(key=lambda c: c["index"])
    prompt_tok = {rid: s.prompt_tokens for (rid, _), s in samples.items()}
    usage = _usage(prompt_tok, {key: s.completion_tokens for key, s in samples.items()})
    return {**head, "choices": choices, "usage": usage}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """The assistant's reply to `messages` under the chat template (`n` samples)."""
    req = await parse_body(request, ChatCompletionRequest)
    st = state_of(request)
    st.check_model(req.model)
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
    ids = st.chat_prompt([m.for_template() for m in req.messages], req.chat_template)
    asked = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    max_tokens = st.max_tokens(len(ids), asked, param, None)
    params = st.params(req.sampling(max_tokens, req.num_logprobs()))
    sub = st.loop.subscribe(req.stream)
    sub.add(ids, params)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": st.model_name}  # fmt: skip
    k = req.top_logprobs or 0

    if req.stream:
        opts = req.stream_options
        head["object"] = "chat.completion.chunk"

        async def render(deltas: AsyncIterator[StreamDelta]):
            include = bool(opts and opts.include_usage)
            started, prompt_tok, done_tok = set(), {}, {}
            async for d in deltas:
                prompt_tok[d.request_id] = d.prompt_tokens
                done_tok[d.index] = d.completion_tokens
                delta = {"content": d.text} if d.text else {}
                if d.index not in started:
                    started.add(d.index)
                    delta = {"role": "assistant", "content": d.text}
                if not (delta or d.finished or (req.logprobs and d.logprobs)):
                    continue
                lp = _chat_logprobs(st, d.logprobs or [], k) if req.logprobs else None
                choice = {"index": d.index, "delta": delta, "logprobs": lp,
                          "finish_reason": d.finish_reason}  # fmt: skip
                chunk = {**head, "choices": [choice]}
                if include:
                    cont = opts.continuous_usage_stats
                    chunk["usage"] = _usage(prompt_tok, done_tok) if cont else None
                yield chunk
            if include:
                yield {**head, "choices": [], "usage": _usage(prompt_tok, done_tok)}

        return await stream(sub, render)

    samples = await collect(request, sub)
    choices = []
    for (_, j), s in sorted(samples.items(), key=lambda kv: kv[0][1]):
        lp = _chat_logprobs(st, s.logprobs, k) if req.logprobs else None
        message = {"role": "assistant", "content": s.text}
        choices.append({"index": j, "message": message, "logprobs": lp,
                        "finish_reason": s.finish_reason})  # fmt: skip
    prompt_tok = {rid: s.prompt_tokens for (rid, _), s in samples.items()}
    usage = _usage(prompt_tok, {key: s.completion_tokens for key, s in samples.items()})
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage}
