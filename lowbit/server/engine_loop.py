"""The server side of the engine process: subscriptions, delivery policy, metrics, failures.

The Engine runs in its own process (engine_process.py). Here, on the server's event loop,
handlers `subscribe` and add requests; commands posted during one turn of the event loop leave
as one message; each step's message from the engine process is read when its pipe is readable
(no thread, so no GIL contention here either) and its deltas are handed to the subscriptions'
asyncio queues. If the engine process dies, /health turns 503 and every request fails at once;
if it stays silent longer than `stall_timeout` while work is outstanding (a hung step), it is
stopped and treated the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from lowbit.engine.request import SamplingParams, StreamDelta
from lowbit.server.engine_process import EngineProcess
from lowbit.server.errors import APIError
from lowbit.server.metrics import Metrics

logger = logging.getLogger(__name__)
_MAX_MESSAGES_PER_READ = 64  # then let HTTP work run before reading on


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
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_ids: list[str] = []
        self.remaining = 0
        self.done = False

    def add(self, prompt_ids: list[int], params: SamplingParams) -> str:
        """Queue one prompt (already encoded and validated); returns its request id."""
        if not self.owner.alive:
            raise APIError(503, "the engine process is not running; restart the server")
        rid = uuid.uuid4().hex
        self.request_ids.append(rid)
        self.remaining += params.n
        self.owner.add(rid, prompt_ids, params, self)
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
            self.owner.abort(self.request_ids)
            # Wakes a task still waiting on the queue; nothing more is delivered to it.
            self.queue.put_nowait(APIError(499, "the client closed the request"))


class EngineLoop:
    """Talks to the engine process from the server's event loop."""

    def __init__(
        self,
        engine: EngineProcess,
        metrics: Metrics | None = None,
        stream_interval: int = 1,
        stall_timeout: float = 300.0,
    ):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be ≥ 1 token, got {stream_interval}")
        if stall_timeout < 0:
            raise ValueError(f"stall_timeout must be ≥ 0 s (0 turns it off), got {stall_timeout}")
        self.engine = engine
        self.stall_timeout = stall_timeout
        self._last_heard = 0.0  # when the engine process last said something (set by start)
        self.last_stats: dict | None = None  # its latest occupancy, copied to /metrics on scrape
        self.stream_interval = stream_interval
        self.metrics = metrics
        self.steps = 0
        self.event_loop: asyncio.AbstractEventLoop | None = None
        self._sinks: dict[str, _Sink] = {}
        self._outbox: list[tuple] = []
        self._calls: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count()
        self._running = False

    def start(self) -> None:
        """Start reading the engine process's messages on the running event loop."""
        self.event_loop = asyncio.get_running_loop()
        self.event_loop.add_reader(self.engine.results.fileno(), self._read)
        self._running = True
        if self.stall_timeout:
            self._last_heard = time.monotonic()
            self.event_loop.call_later(self._watch_period, self._watch)

    @property
    def _watch_period(self) -> float:
        return min(5.0, self.stall_timeout / 4)

    def _watch(self) -> None:
        """Stop an engine process that has said nothing for `stall_timeout` s while requests or
        calls wait on it (idle time does not count: it sends nothing when it has nothing to do)."""
        if not self._running:
            return
        now = time.monotonic()
        if not self._sinks and not self._calls:
            self._last_heard = now
        elif now - self._last_heard > self.stall_timeout:
            self._engine_hung(now - self._last_heard)
            return
        self.event_loop.call_later(self._watch_period, self._watch)

    def stop(self) -> None:
        """Stop the engine process; requests still running fail with 503."""
        self._detach()
        self.engine.stop()
        self._fail_all(APIError(503, "the server is shutting down; retry on another server"))

    @property
    def alive(self) -> bool:
        """Whether the engine process is running and its messages are being read."""
        return self._running and self.engine.alive

    def subscribe(self, stream: bool) -> Subscription:
        """A new subscription for the calling asyncio task (`stream`: wants deltas as they come)."""
        return Subscription(self, self.stream_interval if stream else 0)

    def add(self, rid: str, prompt_ids: list[int], params: SamplingParams, sub) -> None:
        """Send a request to the engine; its deltas will go to `sub`."""
        self._sinks[rid] = _Sink(sub, params.n, time.perf_counter())
        if self.metrics:
            self.metrics.prompt_tokens.inc(len(prompt_ids))
        self._post(("add", rid, prompt_ids, params))

    def abort(self, request_ids: list[str]) -> None:
        """Abort these requests (their KV blocks are freed); nothing more is delivered for them."""
        for rid in request_ids:
            if self._sinks.pop(rid, None) is not None:
                self._post(("abort", rid))

    async def call(self, fn: Callable, *args):
        """`fn(engine, *args)` run in the engine process (fn must be importable there)."""
        if not self.alive:
            raise APIError(503, "the engine process is not running; restart the server")
        token = next(self._tokens)
        self._calls[token] = fut = self.event_loop.create_future()
        self._post(("call", token, fn, args))
        return await fut

    def _post(self, command: tuple) -> None:
        """Queue a command; those of one event-loop turn go to the engine as one message."""
        if not self._outbox:
            self.event_loop.call_soon(self._flush)
        self._outbox.append(command)

    def _flush(self) -> None:
        """Send the queued commands."""
        cmds, self._outbox = self._outbox, []
        if cmds and self.alive:
            self.engine.send(cmds)

    # ---- messages from the engine process ----

    def _read(self) -> None:
        """Handle the messages waiting in the pipe; a closed pipe means the engine died."""
        conn = self.engine.results
        try:
            for _ in range(_MAX_MESSAGES_PER_READ):
                if not conn.poll():
                    return
                self._last_heard = time.monotonic()
                self._handle(self.engine.receive())
        except (EOFError, OSError):
            self._engine_died()
        except Exception:  # a bug in our own bookkeeping must not stop reading
            logger.exception("handling a message of the engine process failed; continuing")

    def _handle(self, msg: tuple) -> None:
        """Dispatch one message."""
        kind = msg[0]
        if kind == "step":
            self._step(msg[1], msg[2])
            self.last_stats = msg[3]
        elif kind == "stats":
            self.last_stats = msg[1]
        elif kind == "fail":
            _, rids, status, message, param = msg
            self._fail([r for r in rids if r in self._sinks], APIError(status, message, param))
        elif kind == "reply":
            _, token, ok, value = msg
            fut = self._calls.pop(token, None)
            if fut is not None and not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(RuntimeError(f"in the engine process: {value}"))

    def _step(self, seconds: float, deltas: list[tuple]) -> None:
        """Deliver one step's deltas to their subscriptions."""
        self.steps += 1
        now = time.perf_counter()
        if self.metrics:
            self.metrics.steps.inc()
            self.metrics.step_seconds.inc(seconds)
        sinks = self._sinks
        for t in deltas:
            sink = sinks.get(t[0])
            if sink is None:
                continue  # aborted or failed earlier
            d = StreamDelta(*t)
            self._observe(sink, d, now)
            ready = sink.release(d)
            if ready is not None:
                sink.sub.queue.put_nowait(ready)
            if d.finish_reason is not None:
                sink.finished += 1
                if sink.finished == sink.n:
                    del sinks[d.request_id]

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

    def _detach(self) -> None:
        """Stop reading the engine process (it is gone, hung or being stopped)."""
        if self._running:
            self._running = False
            self.event_loop.remove_reader(self.engine.results.fileno())

    def _engine_died(self) -> None:
        """The engine process is gone: stop reading, fail everything waiting on it."""
        self._detach()
        proc = self.engine.process
        proc.join(1)
        message = (f"the engine process exited unexpectedly (exit code {proc.exitcode}); "
                   f"restart the server")  # fmt: skip
        logger.error("%s", message)
        self._fail_all(APIError(500, message))

    def _engine_hung(self, silent: float) -> None:
        """The engine process stopped answering: kill it (it cannot read a stop command; the
        shutdown reaps it), fail everything waiting on it."""
        self._detach()
        self.engine.process.kill()
        message = (
            f"the engine process stopped answering (silent for {silent:.0f} s, over "
            f"--engine-stall-timeout {self.stall_timeout:g} s); restart the server"
        )
        logger.error("%s; it was killed", message)
        self._fail_all(APIError(503, message))

    def _fail_all(self, error: APIError) -> None:
        """Fail every tracked request and pending call."""
        self._fail(list(self._sinks), error)
        calls, self._calls = self._calls, {}
        for fut in calls.values():
            if not fut.done():
                fut.set_exception(error)

    def _fail(self, rids: list[str], error: APIError) -> None:
        """Hand each of these requests' subscribers the error; the engine has dropped them."""
        for rid in rids:
            sink = self._sinks.pop(rid)
            sink.sub.queue.put_nowait(error)


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
