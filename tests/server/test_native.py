"""httpx against /generate (SGLang's native shape), /health and /metrics."""

from __future__ import annotations

import json

EXACT = {"ignore_eos": True}


def _events(r) -> list:
    """The JSON payloads of a server-sent event stream, checking it ends with [DONE]."""
    data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_health(http):
    """/health answers 200."""
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_generate_text(http):
    """One text prompt: text, output_ids and meta_info with an exact token count."""
    r = http.post("/generate", json={"text": "Hello", "sampling_params":
                                     {"max_new_tokens": 6, "temperature": 0, **EXACT}})  # fmt: skip
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["output_ids"]) == 6 and isinstance(out["text"], str)
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["completion_tokens"] == 6 and meta["prompt_tokens"] > 0


def test_generate_batch_ids_and_logprobs(http, server):
    """A batch of token-id prompts with logprobs comes back as a list, in order."""
    ids = server.engine.encode("Hello")
    body = {"input_ids": [ids, ids + ids], "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {"max_new_tokens": 3, "temperature": 0, **EXACT}}  # fmt: skip
    out = http.post("/generate", json=body).json()
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [len(ids), 2 * len(ids)]
    meta = out[0]["meta_info"]
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out[0]["output_ids"]
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])


def test_generate_max_new_tokens_zero(http):
    """max_new_tokens=0 is allowed natively and returns no tokens."""
    out = http.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 0}})
    assert out.status_code == 200 and out.json()["output_ids"] == []


def test_generate_stream(http):
    """Streaming /generate sends cumulative text and ends with [DONE]."""
    body = {"text": "Hello", "stream": True,
            "sampling_params": {"max_new_tokens": 5, "temperature": 0, **EXACT}}  # fmt: skip
    with http.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        events = _events(r)
    full = http.post("/generate", json={**body, "stream": False}).json()
    assert events[-1]["text"] == full["text"] and events[-1]["output_ids"] == full["output_ids"]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_metrics(http):
    """/metrics is Prometheus text with the request, token, queue, KV and latency series."""
    http.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 3, **EXACT}})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("lowbit_requests_total", "lowbit_prompt_tokens_total",
                 "lowbit_generation_tokens_total", "lowbit_num_running_reqs",
                 "lowbit_num_queue_reqs", "lowbit_kv_cache_usage", "lowbit_kv_blocks_used",
                 "lowbit_time_to_first_token_seconds_bucket",
                 "lowbit_inter_token_latency_seconds_bucket",
                 "lowbit_e2e_request_latency_seconds_bucket"):  # fmt: skip
        assert name in text, name
    assert 'route="/generate",status="200"' in text
    generated = [line for line in text.splitlines()
                 if line.startswith("lowbit_generation_tokens_total")]  # fmt: skip
    assert float(generated[0].split()[-1]) >= 3
