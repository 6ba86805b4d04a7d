"""Bad requests: each gets OpenAI's error JSON and the right 4xx; the server goes on serving."""

from __future__ import annotations

import pytest

MODEL = "tiny"
C, CH, G = "/v1/completions", "/v1/chat/completions", "/generate"
OK_C = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
OK_CH = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG = "x" * 2000  # far more tokens than the tiny model's 256-token context

# (route, body (dict, or raw bytes), status, param the error names)
CASES = [
    (C, b"{not json", 400, None),
    (C, b"", 400, None),
    (C, b"[1, 2]", 400, None),
    (C, {"prompt": "Hello"}, 400, "model"),
    (C, {**OK_C, "model": "gpt-4"}, 404, "model"),
    (C, {**OK_C, "max_tokens": 0}, 400, "max_tokens"),
    (C, {**OK_C, "max_tokens": -5}, 400, "max_tokens"),
    (C, {**OK_C, "max_tokens": "ten"}, 400, "max_tokens"),
    (C, {**OK_C, "max_tokens": 10_000}, 400, "max_tokens"),
    (C, {**OK_C, "prompt": LONG}, 400, "prompt"),
    (C, {**OK_C, "prompt": ""}, 400, "prompt"),
    (C, {**OK_C, "prompt": []}, 400, "prompt"),
    (C, {**OK_C, "prompt": [1, 10**9]}, 400, "prompt"),
    (C, {**OK_C, "prompt": 42}, 400, "prompt"),
    (C, {**OK_C, "n": 0}, 400, "n"),
    (C, {**OK_C, "n": 1000}, 400, "n"),
    (C, {**OK_C, "logprobs": 50}, 400, "logprobs"),
    (C, {**OK_C, "logprobs": -1}, 400, "logprobs"),
    (C, {**OK_C, "temperature": -1}, 400, "temperature"),
    (C, {**OK_C, "top_p": 0}, 400, "top_p"),
    (C, {**OK_C, "stop": [""]}, 400, "stop"),
    (C, {**OK_C, "stream": "yes"}, 400, "stream"),
    (C, {**OK_C, "max_tokenz": 3}, 400, "max_tokenz"),
    (C, {**OK_C, "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    (CH, {**OK_CH, "messages": []}, 400, "messages"),
    (CH, {**OK_CH, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    (CH, {**OK_CH, "messages": "hi"}, 400, "messages"),
    (CH, {**OK_CH, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    (CH, {**OK_CH, "top_logprobs": 2}, 400, "top_logprobs"),
    (CH, {**OK_CH, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CH, {**OK_CH, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (CH, {**OK_CH, "tools": [{"type": "function"}]}, 400, "tools"),
    (CH, {**OK_CH, "model": "nope"}, 404, "model"),
    (G, {"sampling_params": {"max_new_tokens": 2}}, 400, "text"),
    (G, {"text": "Hi", "input_ids": [1, 2]}, 400, "text"),
    (G, {"text": "Hi", "sampling_params": {"temperature": -1}}, 400, "temperature"),
    (G, {"text": "Hi", "sampling_params": {"bogus": 1}}, 400, None),
    (G, {"text": "Hi", "sampling_params": {"max_new_tokens": 10_000}}, 400, "max_new_tokens"),
    (G, {"text": ["a", "b"], "sampling_params": [{}]}, 400, "sampling_params"),
    (G, {"input_ids": [[1, 2], [-1]]}, 400, "input_ids.1.0"),
]


@pytest.mark.parametrize("route,body,status,param", CASES)
def test_bad_request(http, route, body, status, param):
    """The status, OpenAI's error shape, the param named; a good request succeeds after."""
    if isinstance(body, bytes):
        r = http.post(route, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param, err
    good = http.post(C, json=OK_C)
    assert good.status_code == 200, good.text


def test_body_too_large(http):
    """A body over the size limit is refused before it is read as JSON."""
    r = http.post(C, content=b" " * (32 * 2**20 + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_stream_bad_request_is_json_not_sse(http):
    """A streaming request that is invalid gets a JSON error, not an event stream."""
    r = http.post(C, json={**OK_C, "stream": True, "max_tokens": 0})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize(
    "method,path,status",
    [("GET", "/v1/nothing", 404), ("GET", C, 405), ("DELETE", "/generate", 405)],
)
def test_unknown_route_and_method(http, method, path, status):
    """Unknown routes and methods also answer in OpenAI's error shape."""
    r = http.request(method, path)
    assert r.status_code == status and r.json()["error"]["message"]


def test_openai_client_raises_typed_errors(client):
    """The openai client maps our statuses to its exception classes."""
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100_000)
