"""A real uvicorn server on 127.0.0.1 (in a thread) over a tiny random Llama, shared per session."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

import lowbit
from lowbit.server.app import create_app

MODEL = "tiny"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    """A running server: its URL, engine and app."""

    url: str
    engine: lowbit.Engine
    app: object

    @property
    def loop(self):
        """The server's engine loop."""
        return self.app.state.server.loop

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Engine stats once nothing runs or waits and no KV block is used (or the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine.stats()
            idle = not stats["running"] and not stats["waiting"] and not stats["kv_blocks_used"]
            if idle or time.monotonic() > deadline:
                return stats
            time.sleep(0.02)


@pytest.fixture(scope="session")
def server(tiny_llama):
    """Serve the tiny Llama on a free port for the whole session."""
    engine = lowbit.Engine(str(tiny_llama), device="cpu", max_total_tokens=8192)
    app = create_app(engine, MODEL)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    yield Served(f"http://127.0.0.1:{port}", engine, app)
    uv.should_exit = True
    thread.join(10)
    engine.shutdown()


@pytest.fixture
def http(server):
    """An httpx client for the server."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture
def client(server):
    """The official openai client pointed at the server."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
