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
from lowbit.server.engine_process import EngineProcess


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a flag error is only found after the engine process started loading."""

    def start(self):
        raise AssertionError("the engine process started before the flags were checked")

    monkeypatch.setattr(EngineProcess, "start", start)


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
        (["--engine-stall-timeout", "-1"], "0 turns the check off"),
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
    assert eargs.overlap_schedule
    args = launch_server.build_parser().parse_args(["--disable-overlap-schedule"])
    assert not launch_server.engine_args(args).overlap_schedule


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tiny_llama, *flags: str) -> tuple[subprocess.Popen, str]:
    """`python -m lowbit.launch_server` on the tiny model; returns once /health answers 200."""
    port = _free_port()
    cmd = [sys.executable, "-m", "lowbit.launch_server", "--model-path", str(tiny_llama),
           "--port", str(port), "--device", "cpu", "--max-total-tokens", "2048",
           "--log-level", "warning", *flags]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not come up: {proc.stdout.read().decode()}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def _stop(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` and wait for the server to exit (killing it after 20 s)."""
    proc.send_signal(sig)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _descendants(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent chain leads to `pid`, from /proc."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parent[int(stat.parent.name)] = int(fields[1])
    out, todo = set(), [pid]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parent.items() if pp == pid]
        out.update(kids)
        todo += kids
    return out


def _alive(pids: set[int], within: float) -> set[int]:
    """The processes of `pids` still running (not zombies) after waiting up to `within` s."""
    deadline = time.monotonic() + within
    while True:
        left = set()
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                left.add(pid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_api_key_on_a_real_server_process(tiny_llama):
    """401 without or with a wrong key, 200 with it (openai client too), /health always open."""
    openai = pytest.importorskip("openai")
    proc, url = _start_server(tiny_llama, "--api-key", "s3cret", "--served-model-name", "mine")
    children = _descendants(proc.pid)
    try:
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
        _stop(proc, signal.SIGINT)  # Ctrl-C
    assert proc.returncode == 0
    assert not _alive(children, within=10), "processes outlived the server"


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_server_stops_leave_no_orphan(tiny_llama, sig):
    """However the server process ends, its engine process (and any helper) ends with it."""
    proc, url = _start_server(tiny_llama)
    try:
        children = _descendants(proc.pid)
        assert children, "the engine runs in a process of its own"
        r = httpx.post(f"{url}/generate", json={"text": "Hi", "sampling_params":
                                                {"max_new_tokens": 2}})  # fmt: skip
        assert r.status_code == 200
    finally:
        _stop(proc, sig)
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 0)
    assert not _alive(children, within=10), "processes outlived the server"


def test_engine_start_error_fails_before_the_port_is_bound(capsys, monkeypatch):
    """A model path that does not exist: exit status 2 with the engine's message, and uvicorn
    (which binds the port) is never started."""
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: started.append(a))
    status = launch_server.main(["--model-path", "/no/such/model", "--port", str(_free_port())])
    assert status == 2
    assert "/no/such/model' does not exist" in capsys.readouterr().err
    assert not started


@pytest.mark.skipif(
    not (Path(lowbit.__file__).parent / "demo_model" / "config.json").is_file(),
    reason="the demo model is not in the package",
)
def test_demo_model_served_by_default():
    """With no --model-path the server serves the bundled demo model as 'lowbit-demo'."""
    openai = pytest.importorskip("openai")
    from fastapi.testclient import TestClient

    from lowbit.config import EngineArgs
    from lowbit.server.app import create_app

    args = launch_server.build_parser().parse_args([])
    engine = EngineProcess(EngineArgs(args.model_path, device="cpu"))
    engine.start()
    app = create_app(engine, launch_server.served_name(args))
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http)
        assert [m.id for m in client.models.list().data] == ["lowbit-demo"]
        out = client.chat.completions.create(
            model="lowbit-demo", messages=[{"role": "user", "content": "def add(a, b):"}],
            max_tokens=4, extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert out.usage.completion_tokens == 4
    assert not engine.alive  # the app's shutdown stopped the engine process
