"""Many clients at once, clients that leave, and a model failure: the server keeps serving."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

MODEL = "tiny"
EXACT = {"ignore_eos": True}


def test_64_concurrent_streams(server):
    """64 streaming requests are batched together, all finish exact, and the KV cache empties."""
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    lengths = [8 + i % 9 for i in range(64)]
    steps_before = server.loop.steps

    async def one(i: int):
        stream = await client.completions.create(
            model=MODEL, prompt=f"Request {i}: hello", max_tokens=lengths[i], stream=True,
            stream_options={"include_usage": True}, extra_body=EXACT,
        )  # fmt: skip
        text, reasons, usage = "", [], None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                reasons.append(chunk.choices[0].finish_reason)
            else:
                usage = chunk.usage
        return text, reasons, usage

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await client.close()

    results = asyncio.run(all_of_them())
    for n, (text, reasons, usage) in zip(lengths, results):
        assert usage.completion_tokens == n and reasons[-1] == "length" and text
        assert all(r is None for r in reasons[:-1])
    # Batched: far fewer engine steps than the 800 tokens generated one by one.
    assert server.loop.steps - steps_before < sum(lengths) // 4
    stats = server.wait_idle()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0


@pytest.fixture
def slow_model(server, monkeypatch):
    """Each forward pass takes ≥ 20 ms, so a long request is still running when a client leaves."""
    forward = server.engine.runner.forward

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(server.engine.runner, "forward", slow)


def test_stream_disconnect_frees_blocks(server, slow_model):
    """Closing a stream mid-way aborts the request and frees its KV blocks."""
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 200, "stream": True, **EXACT}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert server.engine.stats()["kv_blocks_used"] > 0
    t0 = time.monotonic()
    stats = server.wait_idle(timeout=2)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
    assert time.monotonic() - t0 < 2  # aborted, not run to its 200 tokens (≥ 4 s here)


def test_non_stream_disconnect_frees_blocks(server, slow_model):
    """A non-streaming client that times out has its request aborted too."""
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 200, "n": 4, **EXACT}
    with httpx.Client(base_url=server.url, timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body)
    stats = server.wait_idle(timeout=2)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0


def test_model_failure_fails_its_batch_only(server, http, monkeypatch):
    """An exception in the model fails the requests of that step with 500; serving goes on."""
    forward = server.engine.runner.forward
    calls = {"n": 0}

    def broken_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected model failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(server.engine.runner, "forward", broken_once)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4})
    assert r.status_code == 500
    assert "injected model failure" in r.json()["error"]["message"]
    assert server.loop.alive
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4})
    assert r.status_code == 200
    assert server.wait_idle()["kv_blocks_used"] == 0


def test_model_failure_mid_stream_sends_error_event(server, http, monkeypatch):
    """A failure after a stream started ends it with an error event and [DONE]."""
    forward = server.engine.runner.forward
    calls = {"n": 0}

    def broken_later(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure mid-stream")
        return forward(*args, **kwargs)

    monkeypatch.setattr(server.engine.runner, "forward", broken_later)
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 20, "stream": True, **EXACT}
    with http.stream("POST", "/v1/completions", json=body) as r:
        data = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    assert '"error"' in data[-2] and data[-1] == "data: [DONE]"
    assert server.wait_idle()["kv_blocks_used"] == 0
