"""`python -m lowbit.launch_server` / `lowbit serve`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
from pathlib import Path

from lowbit.config import (
    KV_CACHE_DTYPES,
    LM_HEAD_HELP,
    LOAD_FORMATS,
    QUANT_HELP,
    TORCHAO_HELP,
    EngineArgs,
)

DEMO_MODEL_NAME = "lowbit-demo"
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def build_parser(prog: str = "python -m lowbit.launch_server") -> argparse.ArgumentParser:
    """The server's command line (SGLang's flag names)."""
    p = argparse.ArgumentParser(prog=prog, description="lowbit's OpenAI-compatible server.")
    m = p.add_argument_group("model")
    m.add_argument(
        "--model-path",
        default=None,
        help="HF directory or hub id (default: the bundled demo model)",
    )
    m.add_argument(
        "--quantization",
        default=None,
        help=QUANT_HELP,
    )
    m.add_argument("--torchao-config", default=None, help=TORCHAO_HELP)
    m.add_argument("--quantize-lm-head", action="store_true", help=LM_HEAD_HELP)
    m.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    m.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    m.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    m.add_argument("--context-length", type=int, default=None, help="longest prompt + output")
    m.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    m.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="refused: lowbit never executes code from a checkpoint",
    )
    m.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template file (default: the tokenizer's)",
    )
    r = p.add_argument_group("runtime")
    r.add_argument(
        "--mem-fraction-static",
        type=float,
        default=0.85,
        help="fraction of GPU memory for weights and KV cache",
    )
    r.add_argument("--max-running-requests", type=int, default=256)
    r.add_argument("--max-total-tokens", type=int, default=None, help="KV cache capacity in tokens")
    r.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=None,
        help="most tokens in one forward pass (default: by GPU memory, 2048-8192; 2048 on CPU)",
    )
    r.add_argument("--disable-cuda-graph", action="store_true")
    r.add_argument(
        "--disable-overlap-schedule",
        action="store_true",
        help="handle each decode step's tokens before launching the next one (by default the "
        "next step is launched first, and the host work overlaps the GPU's)",
    )
    r.add_argument("--tp-size", type=int, default=1, help="tensor parallel size (only 1 for now)")
    r.add_argument("--random-seed", type=int, default=0)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    s.add_argument("--port", type=int, default=30000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    s.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send (default: --model-path)",
    )
    s.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="tokens per streamed chunk after the first (more: less HTTP work)",
    )
    s.add_argument(
        "--engine-stall-timeout",
        type=float,
        default=300.0,
        help="seconds the engine may stay silent with requests waiting before it is declared "
        "hung, stopped and /health turns 503 (0: never)",
    )
    s.add_argument("--log-level", default="info", choices=_LOG_LEVELS)
    return p  # fmt: skip


def engine_args(args: argparse.Namespace) -> EngineArgs:
    """EngineArgs from parsed flags; raises ValueError for values or combinations that can't run."""
    if args.trust_remote_code:
        raise ValueError(
            "--trust-remote-code is refused: lowbit never executes code from a checkpoint; "
            "drop the flag (supported architectures are implemented in lowbit itself)"
        )
    return EngineArgs(
        model_path=args.model_path, quantization=args.quantization,
        torchao_config=args.torchao_config, dtype=args.dtype, device=args.device,
        kv_cache_dtype=args.kv_cache_dtype, load_format=args.load_format,
        context_length=args.context_length, seed=args.random_seed,
        max_total_tokens=args.max_total_tokens, max_running_requests=args.max_running_requests,
        max_num_batched_tokens=args.chunked_prefill_size,
        mem_fraction_static=args.mem_fraction_static, disable_cuda_graph=args.disable_cuda_graph,
        overlap_schedule=not args.disable_overlap_schedule, tp_size=args.tp_size,
        quantize_lm_head=args.quantize_lm_head,
    )  # fmt: skip


def read_chat_template(value: str | None) -> str | None:
    """The template text of --chat-template: a file's contents, or an inline Jinja string."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is not a file; give a Jinja template file")


def served_name(args: argparse.Namespace) -> str:
    """The model name clients send: --served-model-name, else --model-path, else the demo's."""
    return args.served_model_name or args.model_path or DEMO_MODEL_NAME


def check_port(host: str, port: int) -> None:
    """Fail before loading weights when the address can't be bound."""
    if not 0 < port < 65536:
        raise ValueError(f"--port {port} is not a TCP port; use 1-65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is in use; pass another --port") from e
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); check --host") from e


def main(argv: list[str] | None = None) -> int:
    """Parse flags, load the model, serve until interrupted; returns the exit status."""
    parser = build_parser("lowbit serve") if argv is not None else build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        eargs = engine_args(args)
        template = read_chat_template(args.chat_template)
        if args.stream_interval < 1:
            raise ValueError(f"--stream-interval {args.stream_interval}: give 1 or more tokens")
        if args.engine_stall_timeout < 0:
            raise ValueError(f"--engine-stall-timeout {args.engine_stall_timeout}: give seconds "
                             f"≥ 0 (0 turns the check off)")  # fmt: skip
        check_port(args.host, args.port)
    except ValueError as e:
        parser.error(str(e))
    return _serve(args, eargs, template, parser.prog)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _after_uvicorn(signum, frame) -> None:
    """The signal uvicorn re-raises once it has shut down gracefully: already handled."""


def _serve(args: argparse.Namespace, eargs: EngineArgs, template: str | None, prog: str) -> int:
    """Start the engine process, then serve HTTP until a signal; stops both."""
    import uvicorn

    from lowbit.server.app import create_app
    from lowbit.server.engine_process import EngineProcess, EngineStartError

    engine = EngineProcess(eargs, log_level=args.log_level)
    try:
        engine.start()  # loads the model in its own process, before the port is bound
    except EngineStartError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2 if e.clean else 1
    try:
        name = served_name(args)
        app = create_app(
            engine, name, api_key=args.api_key, chat_template=template,
            stream_interval=args.stream_interval, stall_timeout=args.engine_stall_timeout,
        )  # fmt: skip
        url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
        logging.getLogger("lowbit").info(
            "serving %r (context %d tokens) at %s; OpenAI base_url %s/v1",
            name, engine.context_length, url, url,
        )  # fmt: skip
        # The app's shutdown (SIGINT, SIGTERM) stops the engine process; this covers the rest.
        # uvicorn handles SIGINT/SIGTERM while it serves; after its graceful shutdown it restores
        # the handlers it found and re-raises the signal into them. Handlers that do nothing let
        # uvicorn.run return, so the process exits 0 through this function (the engine process is
        # stopped below) — neither dying of SIGTERM nor printing a KeyboardInterrupt traceback.
        saved = {s: signal.signal(s, _after_uvicorn) for s in _STOP_SIGNALS}
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
