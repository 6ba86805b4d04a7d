"""SGLang's native POST /generate: `text` or `input_ids`, `sampling_params`, `stream`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from lowbit.engine.request import StreamDelta
from lowbit.server.errors import APIError
from lowbit.server.protocol import GenerateRequest
from lowbit.server.serving import Sample, collect, parse_body, state_of, stream

router = APIRouter()
_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default


def _finish(reason: str | None, completion_tokens: int) -> dict | None:
    """SGLang's finish_reason object."""
    if reason == "length":
        return {"type": "length", "length": completion_tokens}
    return None if reason is None else {"type": reason}


def _logprob_meta(entries: list[dict], k: int) -> dict:
    """output_token_logprobs ([logprob, token_id, None] each) and output_top_logprobs."""
    meta = {
        "output_token_logprobs": [[v, t, None] for e in entries for t, v in [next(iter(e.items()))]]
    }
    if k:
        meta["output_top_logprobs"] = [
            [[v, t, None] for t, v in sorted(e.items(), key=lambda kv: -kv[1])[:k]] for e in entries
        ]
    return meta


def _item(rid: str, s: Sample, t0: float, logprobs: bool, k: int) -> dict:
    """One sample in SGLang's response shape."""
    meta = {"id": rid, "finish_reason": _finish(s.finish_reason, s.completion_tokens),
            "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "cached_tokens": 0, "e2e_latency": time.perf_counter() - t0}  # fmt: skip
    if logprobs:
        meta.update(_logprob_meta(s.logprobs, k))
    return {"text": s.text, "output_ids": s.token_ids, "meta_info": meta}


@router.post("/generate")
async def generate(request: Request) -> Response:
    """Generate for one prompt or a batch; a list comes back for a batch or n > 1."""
    req = await parse_body(request, GenerateRequest)
    st = state_of(request)
    t0 = time.perf_counter()
    prompts, batch = req.prompts()
    sps = req.sampling_params if isinstance(req.sampling_params, list) else None
    if sps is not None and len(sps) != len(prompts):
        raise APIError(
            400, f"{len(sps)} sampling_params for {len(prompts)} prompts; give one or one each",
            param="sampling_params",
        )  # fmt: skip
    param = "input_ids" if req.text is None else "text"
    jobs = []  # validate every prompt before queueing any
    for i, prompt in enumerate(prompts):
        fields = dict(sps[i] if sps is not None else req.sampling_params or {})
        ids = st.encode(prompt, param)
        asked = fields.pop("max_new_tokens", fields.pop("max_tokens", None))
        if asked is not None and not isinstance(asked, int):
            raise APIError(400, f"max_new_tokens={asked!r} is not an integer", "max_new_tokens")
        if asked is None or asked > 0:
            asked = st.max_tokens(len(ids), asked, "max_new_tokens", _DEFAULT_MAX_NEW_TOKENS)
        if req.return_logprob:
            fields["logprobs"] = req.top_logprobs_num
        jobs.append((ids, st.params({**fields, "max_new_tokens": asked})))
    sub = st.loop.subscribe(req.stream)
    order: dict[str, int] = {}  # request id → index of its first sample in the response
    base = 0
    for ids, params in jobs:
        order[sub.add(ids, params)] = base
        base += params.n
    many = batch or base > 1
    k = req.top_logprobs_num

    if req.stream:

        async def render(deltas: AsyncIterator[StreamDelta]):
            acc: dict[tuple[str, int], Sample] = {}
            async for d in deltas:
                s = acc.setdefault((d.request_id, d.index), Sample())
                s.text += d.text
                s.token_ids += d.token_ids
                s.logprobs += d.logprobs or []
                s.finish_reason = d.finish_reason
                s.prompt_tokens, s.completion_tokens = d.prompt_tokens, d.completion_tokens
                item = _item(d.request_id, s, t0, req.return_logprob, k)
                item["index"] = order[d.request_id] + d.index
                yield item

        return await stream(sub, render)

    samples = await collect(request, sub)
    keyed = sorted(samples.items(), key=lambda kv: order[kv[0][0]] + kv[0][1])
    items = [_item(rid, s, t0, req.return_logprob, k) for (rid, _), s in keyed]
    return items if many else items[0]
