"""The engine loop: one thread owns the Engine; HTTP handlers reach it through queues.

Only the loop thread calls `add_request`, `step`, `abort` and `release`. Handlers post commands
to a thread-safe inbox; the loop hands each step's deltas back to the handlers' asyncio queues
with one `call_soon_threadsafe` per step and event loop, so HTTP work never runs on the engine
thread and the engine never waits for HTTP.

Both threads share the GIL: torch releases it for kernels, but HTTP work (≈0.1 ms of Python per
streamed chunk) still slows a Python-bound step. tests/server/bench_engine_loop.py measures it;
`--stream-interval` (fewer, larger chunks) and non-streaming requests (one delivery at the end)
cut that work. Moving the engine into its own process, as SGLang does, would remove it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from lowbit.engine.request import SamplingParams, StreamDelta
from lowbit.server.errors import APIError, bad_request
from lowbit.server.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass
class _Sink:
    """Where one request's deltas go, and what the loop tracks about it."""

    sub: Subscription
    n: int
    submitted: float
    finished: int = 0
    last_token: dict[int, float] = field(default_factory=dict)
    held: dict[int, StreamDelta] = field(default_factory=dict)  # per sample, not yet delivered

    def release(self, d: StreamDelta) -> StreamDelta | None:
        """The delta to deliver now (merged with held ones), or None to hold it back.

        A streaming subscriber gets the first token at once, then every `interval` tokens; a
        non-streaming one (interval 0) only the final delta, so it costs no wake-up per token.
        """
        held = self.held.pop(d.index, None)
        if held is not None:
            d = _merge(held, d)
        interval = self.sub.interval
        first = d.completion_tokens == len(d.token_ids)
        if d.finished or (interval and (first or d.completion_tokens % interval == 0)):
            return d
        self.held[d.index] = d
        return None


class Subscription:
    """Deltas of one or more requests, delivered to the asyncio task that submitted them."""

    def __init__(self, owner: EngineLoop, interval: int):
        self.owner = owner
        self.interval = interval
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_ids: list[str] = []
        self.remaining = 0
        self.done = False

    def add(self, prompt_ids: list[int], params: SamplingParams) -> str:
        """Queue one prompt (already encoded and validated); returns its request id."""
        if not self.owner.alive:
            raise APIError(503, "the engine loop is not running; restart the server")
        rid = uuid.uuid4().hex
        self.request_ids.append(rid)
        self.remaining += params.n
        self.owner.post(("add", rid, prompt_ids, params, self))
        return rid

    async def __aiter__(self) -> AsyncIterator[StreamDelta]:
        """Each delta as it comes; raises the APIError of a failed request.

        Deltas that queued up while the consumer was busy are merged per sample, so a slow
        client costs one chunk per wake-up instead of one per token.
        """
        while self.remaining:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            for item in _coalesce(items):
                if isinstance(item, BaseException):
                    self.remaining = 0
                    raise item
                self.remaining -= item.finished
                yield item
        self.done = True

    def abort(self) -> None:
        """Abort whatever of these requests is still running (a no-op once all finished)."""
        if not self.done:
            self.done = True
            for rid in self.request_ids:
                self.owner.post(("abort", rid))
            # Wakes a task still waiting on the queue; the loop sends nothing more.
            self.queue.put_nowait(APIError(499, "the client closed the request"))


class EngineLoop:
    """Runs `engine.step()` in a background thread while there is work."""

    def __init__(self, engine, metrics: Metrics | None = None, stream_interval: int = 1):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be ≥ 1 token, got {stream_interval}")
        self.engine = engine
        self.stream_interval = stream_interval
        self.metrics = metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # touched only by the loop thread
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lowbit-engine-loop", daemon=True)
        self.steps = 0

    def start(self) -> None:
        """Start the loop thread."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running fail with 503."""
        self._stopping.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the loop thread is running."""
        return self._thread.is_alive()

    def post(self, command: tuple) -> None:
        """Hand a command to the loop thread (any thread may call this)."""
        self._inbox.put(command)

    def subscribe(self, stream: bool) -> Subscription:
        """A new subscription for the calling asyncio task (`stream`: wants deltas as they come)."""
        return Subscription(self, self.stream_interval if stream else 0)

    # ---- the loop thread ----

    def _run(self) -> None:
        """Apply commands, step while there is work, deliver deltas; never dies of one request."""
        while not self._stopping.is_set():
            try:
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._step()
                if self.metrics:
                    self.metrics.observe_engine(self.engine.stats())
            except Exception:  # a bug in the loop's own bookkeeping must not stop serving
                logger.exception("engine loop iteration failed; continuing")
        self._fail_all(APIError(503, "the server is shutting down; retry on another server"))

    def _drain(self, block: bool) -> None:
        """Apply every queued command; wait for one when the engine is idle."""
        try:
            cmd = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd: tuple) -> None:
        """Add or abort one request."""
        if cmd[0] == "add":
            _, rid, prompt_ids, params, sub = cmd
            if sub.done:
                return  # the client left before the request reached the engine
            try:
                self.engine.add_request(prompt_ids, params, request_id=rid)
            except (ValueError, TypeError) as e:
                self._deliver({sub.loop: [(sub, bad_request(e))]})
                return
            except Exception as e:
                logger.exception("add_request failed")
                self._deliver({sub.loop: [(sub, APIError(500, f"adding the request failed: {e}"))]})
                return
            self._sinks[rid] = _Sink(sub, params.n, time.perf_counter())
            if self.metrics:
                self.metrics.prompt_tokens.inc(len(prompt_ids))
        elif cmd[0] == "abort":
            rid = cmd[1]
            if self._sinks.pop(rid, None) is not None:
                self.engine.abort(rid)  # frees its KV blocks now
                self.engine.release(rid)

    def _step(self) -> None:
        """One engine step; a failure fails the requests of that batch (500), not the loop."""
        t0 = time.perf_counter()
        try:
            deltas = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; failing the requests of its batch")
            self._fail_batch(APIError(500, f"the model failed on this request's batch: {e}"))
            return
        self.steps += 1
        now = time.perf_counter()
        if self.metrics:
            self.metrics.steps.inc()
            self.metrics.step_seconds.inc(now - t0)
        out: dict = defaultdict(list)
        for d in deltas:
            sink = self._sinks.get(d.request_id)
            if sink is None:
                continue  # aborted or failed earlier
            self._observe(sink, d, now)
            ready = sink.release(d)
            if ready is not None:
                out[sink.sub.loop].append((sink.sub, ready))
            if d.finished:
                sink.finished += 1
                if sink.finished == sink.n:
                    del self._sinks[d.request_id]
                    self.engine.release(d.request_id)
        self._deliver(out)

    def _observe(self, sink: _Sink, d: StreamDelta, now: float) -> None:
        """Token counts, time to first token and inter-token latency."""
        if self.metrics is None or not d.token_ids:
            return
        last = sink.last_token.get(d.index)
        if last is None:
            self.metrics.ttft.observe(now - sink.submitted)
        else:
            self.metrics.itl.observe(now - last)
        sink.last_token[d.index] = now
        self.metrics.generation_tokens.inc(len(d.token_ids))

    def _fail_batch(self, error: APIError) -> None:
        """Fail the running requests, and any whose final deltas the failed step dropped."""
        sched = self.engine.scheduler
        running = {s.request_id for s in sched.running}
        waiting = {s.request_id for s in sched.waiting}
        doomed = [rid for rid in self._sinks if rid in running or rid not in waiting]
        self._fail(doomed, error)

    def _fail_all(self, error: APIError) -> None:
        """Fail every tracked request."""
        self._fail(list(self._sinks), error)

    def _fail(self, rids: list[str], error: APIError) -> None:
        """Abort these requests and hand each subscriber the error."""
        out: dict = defaultdict(list)
        for rid in rids:
            sink = self._sinks.pop(rid)
            self.engine.abort(rid)
            self.engine.release(rid)
            out[sink.sub.loop].append((sink.sub, error))
        self._deliver(out)

    @staticmethod
    def _deliver(out: dict) -> None:
        """Put items on their subscribers' asyncio queues, one wake-up per event loop."""
        for loop, items in out.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop has closed; nobody is listening
                pass


def _merge(a: StreamDelta, b: StreamDelta) -> StreamDelta:
    """One delta of a sample that says what `a` then `b` said."""
    lps = (a.logprobs or []) + (b.logprobs or [])
    return StreamDelta(
        b.request_id, b.index, a.text + b.text, a.token_ids + b.token_ids, b.finish_reason,
        lps or None, b.prompt_tokens, b.completion_tokens,
    )  # fmt: skip


def _coalesce(items: list) -> list:
    """Merge the deltas of each sample into one (errors stay as they are, in order)."""
    merged: dict[tuple[str, int], StreamDelta] = {}
    out: list = []
    for item in items:
        if isinstance(item, BaseException):
            out.append(item)
            continue
        key = (item.request_id, item.index)
        prev = merged.get(key)
        if prev is None:
            out.append(key)
        merged[key] = item if prev is None else _merge(prev, item)
    return [merged[x] if isinstance(x, tuple) else x for x in out]


def _put_all(items: list) -> None:
    """Runs on the event loop: hand each item to its subscription."""
    for sub, item in items:
        sub.queue.put_nowait(item)
