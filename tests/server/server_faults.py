"""Faults injected into the engine process's model runner (run there through `Served.call`)."""

from __future__ import annotations

import time


def slow_forward(engine, seconds: float) -> None:
    """Each forward pass takes at least `seconds` longer."""
    forward = engine.runner.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    engine.runner.forward = slow


def fail_forward(engine, at_call: int, message: str) -> None:
    """The `at_call`-th forward pass from now raises RuntimeError(message); the others run."""
    forward = engine.runner.forward
    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise RuntimeError(message)
        return forward(*args, **kwargs)

    engine.runner.forward = broken


def restore_forward(engine) -> None:
    """Undo the faults: the runner's own forward again."""
    engine.runner.__dict__.pop("forward", None)


def exit_now(engine, status: int) -> None:
    """The engine process dies at once, as a crash would."""
    import os

    os._exit(status)
