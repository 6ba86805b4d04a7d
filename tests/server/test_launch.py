"""`python -m lowbit.launch_server` flags, and a real server process guarded by an API key."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import lowbit
from lowbit import cli, launch_server


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a flag error is only found after the engine started loading."""

    def engine(*args, **kwargs):
        raise AssertionError("the engine was built before the flags were checked")

    monkeypatch.setattr(lowbit, "Engine", engine)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--trust-remote-code"], "never executes code"),
        (["--tp-size", "2"], "tensor parallelism is not available"),
        (["--quantization", "fp8", "--torchao-config", "int4wo-128"], "choose one"),
        (["--kv-cache-dtype", "int3"], "invalid choice"),
        (["--max-running-requests", "0"], "max_running_requests must be positive"),
        (["--mem-fraction-static", "1.5"], "mem_fraction_static"),
        (["--port", "70000"], "not a TCP port"),
        (["--chat-template", "no_such_file.jinja"], "not a file"),
        (["--stream-interval", "0"], "give 1 or more tokens"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags_fail_before_loading(no_weights, capsys, argv, message):
    """Each bad flag exits with status 2 and says what is wrong, before any weight is read."""
    with pytest.raises(SystemExit) as exc:
        launch_server.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_port_in_use(no_weights, capsys):
    """A busy port is reported before the model loads."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(SystemExit):
            launch_server.main(["--port", str(s.getsockname()[1])])
    assert "in use" in capsys.readouterr().err


def test_lowbit_serve_takes_the_same_flags(no_weights, capsys):
    """`lowbit serve` goes through the same parser."""
    with pytest.raises(SystemExit):
        cli.main(["serve", "--trust-remote-code"])
    assert "never executes code" in capsys.readouterr().err


def test_parser_defaults():
    """SGLang's defaults: 127.0.0.1:30000, demo model, auto dtypes."""
    args = launch_server.build_parser().parse_args([])
    assert (args.host, args.port, args.model_path, args.dtype) == ("127.0.0.1", 30000, None, "auto")
    eargs = launch_server.engine_args(args)
    assert eargs.tp_size == 1 and eargs.max_running_requests == 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_api_key_on_a_real_server_process(tiny_llama):
    """401 without or with a wrong key, 200 with it (openai client too), /health always open."""
    openai = pytest.importorskip("openai")
    port = _free_port()
    cmd = [sys.executable, "-m", "lowbit.launch_server", "--model-path", str(tiny_llama),
           "--port", str(port), "--api-key", "s3cret", "--served-model-name", "mine",
           "--device", "cpu", "--max-total-tokens", "2048", "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for path in ("/v1/models", "/metrics"):
                r = httpx.get(url + path, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(f"{url}/generate", json={"text": "Hi"})
        assert r.status_code == 401
        ok = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "mine"
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        out = good.chat.completions.create(
            model="mine", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert out.usage.completion_tokens == 3
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0


@pytest.mark.skipif(
    not (Path(lowbit.__file__).parent / "demo_model" / "config.json").is_file(),
    reason="the demo model is not in the package",
)
def test_demo_model_served_by_default():
    """With no --model-path the server serves the bundled demo model as 'lowbit-demo'."""
    openai = pytest.importorskip("openai")
    from fastapi.testclient import TestClient

    from lowbit.server.app import create_app

    args = launch_server.build_parser().parse_args([])
    engine = lowbit.Engine(args.model_path, device="cpu")
    app = create_app(engine, launch_server.served_name(args))
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http)
        assert [m.id for m in client.models.list().data] == ["lowbit-demo"]
        out = client.chat.completions.create(
            model="lowbit-demo", messages=[{"role": "user", "content": "def add(a, b):"}],
            max_tokens=4, extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert out.usage.completion_tokens == 4
    engine.shutdown()
