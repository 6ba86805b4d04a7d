"""The engine process: it alone owns the Engine; the server process reaches it over two channels.

    server process                                   engine process
    EngineLoop.post ─ Queue of command lists ──────▶ apply: add / abort / call / stop
    EngineLoop._read ◀── Pipe, one message a step ─── engine.step() → deltas as plain tuples

As SGLang does, HTTP, tokenization and SSE formatting run in the server process and never take
the GIL from the engine. The command queue's feeder thread means `put` never blocks the server's
event loop; results flow one way through a pipe, so neither side can wait on the other. Each step
sends one pickled message holding every delta of the step as a tuple of plain values, cheaper to
pickle than dataclasses. The process is started with the spawn context so that CUDA is only ever
initialized here, and it exits when the server process goes away, even one killed outright.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lowbit.config import EngineArgs, ModelConfig
from lowbit.engine.engine import Engine, encode_prompt
from lowbit.engine.tokenizer import load_tokenizer
from lowbit.server.errors import bad_request

logger = logging.getLogger(__name__)
_CLEAN_START_ERRORS = (ValueError, TypeError, FileNotFoundError, NotImplementedError)
_IDLE_POLL_S = 0.5  # how often an idle engine process checks that the server is still there


@dataclass(frozen=True)
class EngineInfo:
    """What the server needs to know of the loaded engine."""

    model_dir: Path
    context_length: int
    model_config: ModelConfig


class EngineStartError(RuntimeError):
    """The engine could not start; `clean` when the message says all (bad path, bad flag)."""

    def __init__(self, message: str, clean: bool):
        super().__init__(message)
        self.clean = clean


class EngineProcess:
    """The server's handle on the engine process: start it, send commands, read results."""

    def __init__(self, args: EngineArgs, log_level: str = "info"):
        self.args, self.log_level = args, log_level
        self.process: mp.process.BaseProcess | None = None
        self.info: EngineInfo | None = None
        self.tokenizer = None

    def start(self) -> EngineInfo:
        """Spawn the process and wait until the model is loaded; EngineStartError if it fails."""
        ctx = mp.get_context("spawn")
        self.commands = ctx.Queue()
        self.results, writer = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_main, name="lowbit-engine", daemon=False,
            args=(self.args, self.log_level, self.commands, writer),
        )  # fmt: skip
        atexit.register(self.stop)
        try:
            self.process.start()
            writer.close()  # the child holds the only write end: its exit is EOF here
            try:
                msg = self.receive()
            except EOFError:
                self.process.join(10)
                raise EngineStartError(
                    f"the engine process exited while loading the model (exit code "
                    f"{self.process.exitcode}); see the log above", clean=False,
                ) from None  # fmt: skip
            if msg[0] == "error":
                raise EngineStartError(msg[2], clean=msg[1])
            self.info = msg[1]
            self.tokenizer = load_tokenizer(self.info.model_dir)
        except BaseException:
            self.stop()
            raise
        return self.info

    def receive(self) -> tuple:
        """The next message from the engine process (blocks); EOFError once it has exited."""
        return pickle.loads(self.results.recv_bytes())

    def send(self, commands: list[tuple]) -> None:
        """Queue commands for the engine process (never blocks)."""
        self.commands.put(commands)

    @property
    def alive(self) -> bool:
        """Whether the engine process is running."""
        return self.process is not None and self.process.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the engine process to exit; terminate, then kill it if it does not."""
        proc = self.process
        if proc is None or proc.pid is None:
            return
        if proc.is_alive() and self.info is not None:  # (while loading, nothing is lost)
            try:
                self.send([("stop",)])
            except (OSError, ValueError):
                pass
            proc.join(timeout)
        for end in (proc.terminate, proc.kill):
            if proc.is_alive():
                end()
                proc.join(5)
        self.commands.close()
        self.commands.cancel_join_thread()  # nobody will read what is left; don't wait at exit
        self.results.close()
        atexit.unregister(self.stop)

    # The engine's facts, as the routes read them from an in-process Engine.

    @property
    def model_dir(self) -> Path:
        """The loaded checkpoint's directory."""
        return self.info.model_dir

    @property
    def context_length(self) -> int:
        """Longest prompt + output, in tokens."""
        return self.info.context_length

    @property
    def model_config(self) -> ModelConfig:
        """The model's config."""
        return self.info.model_config

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt, validated exactly as the engine does it, in this process."""
        return encode_prompt(self.tokenizer, self.model_config.vocab_size, self.context_length,
                             prompt)  # fmt: skip


def _build(args: EngineArgs) -> Engine:
    """The engine of these arguments."""
    fields = {f: getattr(args, f) for f in args.__dataclass_fields__}
    return Engine(**fields)


def _main(args, log_level, commands, results) -> None:
    """The engine process: load the model, report, then serve commands until told to stop."""
    # Ctrl-C reaches the whole process group; the server process handles it and stops this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    send = lambda msg: results.send_bytes(pickle.dumps(msg, pickle.HIGHEST_PROTOCOL))
    try:
        engine = _build(args)
    except Exception as e:
        clean = isinstance(e, _CLEAN_START_ERRORS)
        if not clean:
            logger.exception("the engine failed to start")
        send(("error", clean, str(e) if clean else f"{type(e).__name__}: {e}"))
        return
    send(("ready", EngineInfo(engine.model_dir, engine.context_length, engine.model_config)))
    try:
        _Worker(engine, commands, send).run()
    finally:
        engine.shutdown()
        results.close()


class _Worker:
    """Applies commands and steps the engine while there is work, in the engine process."""

    def __init__(self, engine: Engine, commands, send: Callable[[tuple], None]):
        self.engine, self.commands, self.send = engine, commands, send
        self.remaining: dict[str, int] = {}  # request id → samples not yet finished
        self.parent = os.getppid()

    def run(self) -> None:
        """Until a stop command, or until the server process is gone."""
        engine = self.engine
        while os.getppid() == self.parent:
            try:
                cmds = self._receive(block=not engine.has_unfinished())
                if any(c[0] == "stop" for c in cmds):
                    return
                for cmd in cmds:
                    self._apply(cmd)
                if engine.has_unfinished():
                    self._step()
                elif cmds:
                    self.send(("stats", engine.stats()))
            except (OSError, EOFError):  # sending failed: the server process is gone
                return
            except Exception:  # a bug in the bookkeeping must not stop serving
                logger.exception("engine loop iteration failed; continuing")

    def _receive(self, block: bool) -> list[tuple]:
        """Every queued command; waits a while for one when the engine is idle."""
        cmds: list[tuple] = []
        try:
            cmds += self.commands.get(timeout=_IDLE_POLL_S) if block else self.commands.get_nowait()
            while True:
                cmds += self.commands.get_nowait()
        except queue.Empty:
            return cmds

    def _apply(self, cmd: tuple) -> None:
        """Add or abort a request, or run a function on the engine."""
        kind = cmd[0]
        if kind == "add":
            _, rid, prompt_ids, params = cmd
            try:
                self.engine.add_request(prompt_ids, params, request_id=rid)
            except (ValueError, TypeError) as e:
                err = bad_request(e)
                self.send(("fail", [rid], err.status, err.message, err.param))
                return
            except Exception as e:
                logger.exception("add_request failed")
                self.send(("fail", [rid], 500, f"adding the request failed: {e}", None))
                return
            self.remaining[rid] = params.n
        elif kind == "abort":
            rid = cmd[1]
            if self.remaining.pop(rid, None) is not None:
                self.engine.abort(rid)  # frees its KV blocks now
                self.engine.release(rid)
        elif kind == "call":
            _, token, fn, fn_args = cmd
            try:
                self.send(("reply", token, True, fn(self.engine, *fn_args)))
            except Exception as e:
                self.send(("reply", token, False, f"{type(e).__name__}: {e}"))

    def _step(self) -> None:
        """One engine step, sent as one message; a failure fails the requests of that batch."""
        engine = self.engine
        t0 = time.perf_counter()
        try:
            deltas = engine.step()
        except Exception as e:
            logger.exception("engine step failed; failing the requests of its batch")
            self._fail_batch(f"the model failed on this request's batch: {e}")
            return
        seconds = time.perf_counter() - t0
        out, remaining = [], self.remaining
        for d in deltas:
            rid = d.request_id
            left = remaining.get(rid)
            if left is None:
                continue  # aborted or failed earlier
            out.append((rid, d.index, d.text, d.token_ids, d.finish_reason, d.logprobs,
                        d.prompt_tokens, d.completion_tokens))  # fmt: skip
            if d.finish_reason is not None:
                if left == 1:
                    del remaining[rid]
                    engine.release(rid)
                else:
                    remaining[rid] = left - 1
        self.send(("step", seconds, out, engine.stats()))

    def _fail_batch(self, message: str) -> None:
        """Fail the running requests, and any whose final deltas the failed step dropped."""
        sched = self.engine.scheduler
        running = {s.request_id for s in sched.running}
        waiting = {s.request_id for s in sched.waiting}
        doomed = [rid for rid in self.remaining if rid in running or rid not in waiting]
        for rid in doomed:
            del self.remaining[rid]
            self.engine.abort(rid)
            self.engine.release(rid)
        self.send(("fail", doomed, 500, message, None))
