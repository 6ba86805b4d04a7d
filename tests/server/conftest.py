"""A real uvicorn server on 127.0.0.1 (in a thread) over a tiny random Llama, shared per session.

The engine runs in its own process, as in production; tests reach into it with `Served.call`
(functions of server_faults.py run there) and read its occupancy with `Served.stats`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from lowbit.config import EngineArgs
from lowbit.engine.engine import Engine
from lowbit.server.app import create_app
from lowbit.server.engine_process import EngineProcess

MODEL = "tiny"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    """A running server: its URL, engine process and app."""

    url: str
    engine: EngineProcess
    app: object

    @property
    def loop(self):
        """The server's engine loop."""
        return self.app.state.server.loop

    def call(self, fn, *args):
        """`fn(engine, *args)` run in the engine process, from the test's thread."""
        loop = self.loop
        return asyncio.run_coroutine_threadsafe(loop.call(fn, *args), loop.event_loop).result(30)

    def stats(self) -> dict:
        """The engine's queue and KV-cache occupancy, asked of the engine process."""
        return self.call(Engine.stats)

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Engine stats once nothing runs or waits and no KV block is used (or the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            idle = not stats["running"] and not stats["waiting"] and not stats["kv_blocks_used"]
            if idle or time.monotonic() > deadline:
                return stats
            time.sleep(0.02)


@contextmanager
def serve(model_dir, engine_kw: dict | None = None, **app_kw) -> Iterator[Served]:
    """A uvicorn server (in a thread) over an engine process serving `model_dir`; `engine_kw`
    go to EngineArgs, `app_kw` to create_app."""
    engine = EngineProcess(
        EngineArgs(str(model_dir), device="cpu", max_total_tokens=8192, **(engine_kw or {}))
    )
    engine.start()
    app = create_app(engine, MODEL, **app_kw)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield Served(f"http://127.0.0.1:{port}", engine, app)
    finally:
        uv.should_exit = True
        thread.join(10)
        engine.stop()


@pytest.fixture(scope="session")
def server(tiny_llama):
    """Serve the tiny Llama on a free port for the whole session."""
    with serve(tiny_llama) as served:
        yield served


@pytest.fixture
def own_server(tiny_llama):
    """A server of the test's own, for tests that break it."""
    with serve(tiny_llama) as served:
        yield served


@pytest.fixture
def watched_server(tiny_llama):
    """A server of the test's own whose engine counts as hung after 1 s of silence."""
    with serve(tiny_llama, stall_timeout=1.0) as served:
        yield served


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
