"""Many clients at once, clients that leave, and a model failure: the server keeps serving."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from server_faults import exit_now, fail_forward, restore_forward, slow_forward

from lowbit.server.errors import APIError

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
def faults(server):
    """Faults injected into the engine process are undone after the test."""
    yield server
    server.call(restore_forward)


@pytest.fixture
def slow_model(faults):
    """Each forward pass takes ≥ 20 ms, so a long request is still running when a client leaves."""
    faults.call(slow_forward, 0.02)


def test_stream_disconnect_frees_blocks(server, slow_model):
    """Closing a stream mid-way aborts the request and frees its KV blocks."""
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 200, "stream": True, **EXACT}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert server.stats()["kv_blocks_used"] > 0
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


def test_model_failure_fails_its_batch_only(server, http, faults):
    """An exception in the model fails the requests of that step with 500; serving goes on."""
    server.call(fail_forward, 1, "injected model failure")
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4})
    assert r.status_code == 500
    assert "injected model failure" in r.json()["error"]["message"]
    assert server.loop.alive
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4})
    assert r.status_code == 200
    assert server.wait_idle()["kv_blocks_used"] == 0


def test_model_failure_mid_stream_sends_error_event(server, http, faults):
    """A failure after a stream started ends it with an error event and [DONE]."""
    server.call(fail_forward, 3, "injected failure mid-stream")
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 20, "stream": True, **EXACT}
    with http.stream("POST", "/v1/completions", json=body) as r:
        data = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    assert '"error"' in data[-2] and data[-1] == "data: [DONE]"
    assert server.wait_idle()["kv_blocks_used"] == 0


def test_engine_process_crash_fails_requests_not_hangs(own_server):
    """When the engine process dies, running and new requests fail and /health reports it."""
    served = own_server
    with httpx.Client(base_url=served.url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        served.call(slow_forward, 0.05)
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 200, "stream": True, **EXACT}
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            with pytest.raises(APIError, match="exited unexpectedly"):  # no reply: it is gone
                served.call(exit_now, 3)
            rest = [line for line in lines if line.startswith("data: ")]
        assert '"error"' in rest[-2] and "exited unexpectedly" in rest[-2]
        assert rest[-1] == "data: [DONE]"
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["error"]["message"]
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
        assert http.get("/v1/models").status_code == 200  # what needs no engine still answers


def test_hung_engine_is_stopped_and_requests_fail(watched_server):
    """An engine process that stays silent past the stall timeout with a request waiting is
    stopped: the request fails with 503 instead of hanging, and /health reports it."""
    served = watched_server
    with httpx.Client(base_url=served.url, timeout=30) as http:
        served.call(slow_forward, 0.2)  # a quiet server is not hung: idle time does not count
        time.sleep(1.5)
        assert http.get("/health").status_code == 200
        served.call(slow_forward, 4.0)  # each forward now outlasts the timeout
        t0 = time.monotonic()
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 503 and "stopped answering" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 4.0  # failed by the watchdog, before the 4 s step ends
        assert http.get("/health").status_code == 503
        served.engine.process.join(5)  # killed without waiting, so as not to block the loop
        assert not served.engine.alive


def test_overlapped_server_streams_what_the_plain_one_does(server, tiny_llama):
    """The server (overlap_schedule on, the default) streams 16 concurrent greedy requests of
    mixed lengths token for token as a server without it does, and ends idle."""
    from conftest import serve

    def run(url: str) -> list[tuple[str, list]]:
        async def one(client, i: int):
            stream = await client.completions.create(
                model=MODEL, prompt=f"Request {i}: hello", max_tokens=4 + i % 7, stream=True,
                temperature=0, extra_body=EXACT,
            )  # fmt: skip
            text, reasons = "", []
            async for chunk in stream:
                text += chunk.choices[0].text
                reasons.append(chunk.choices[0].finish_reason)
            return text, reasons[-1]

        async def all_of_them():
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            try:
                return await asyncio.gather(*(one(client, i) for i in range(16)))
            finally:
                await client.close()

        return asyncio.run(all_of_them())

    openai = pytest.importorskip("openai")
    with serve(tiny_llama, engine_kw={"overlap_schedule": False}) as plain:
        want = run(plain.url)
    assert server.engine.args.overlap_schedule
    assert run(server.url) == want
    stats = server.wait_idle()
    assert all(reason == "length" for _, reason in want)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
