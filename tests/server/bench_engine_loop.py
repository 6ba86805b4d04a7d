"""Does the HTTP server keep the engine busy?  `engine.step()` alone vs 64 concurrent streams.

    .venv/bin/python tests/server/bench_engine_loop.py [--model-path DIR] [--streams 64]

1. Baseline: 64 requests added to a bare Engine, `step()` in a tight loop (in a thread).
2. Server: the same 64 requests as concurrent streaming /v1/completions from a client process
   (`python -m lowbit.launch_server` in another), timed from first request to last [DONE].
Rounds of the two alternate (--rounds each; on a GPU the baseline's go first) and the best of
each counts: other jobs on a shared machine only slow a round down. Prints tokens/s of both,
their ratio, and the server's steps and inter-token latency (from /metrics). The client, the
server and the engine process share the machine's cores.
Not a test: numbers depend on the machine (see benchmarks/ for GPU numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

import lowbit


class Alone:
    """The requests through `engine.step()` alone, in a worker thread as the server steps them
    (on a busy CPU, torch's OpenMP threads in the main thread can be several times slower than
    in a worker, which would flatter the server)."""

    def __init__(self, args):
        self.args = args
        self.pool = ThreadPoolExecutor(1)
        self.engine = self.pool.submit(self._build).result()

    def _build(self) -> lowbit.Engine:
        args = self.args
        engine = lowbit.Engine(
            args.model_path, device=args.device, dtype=args.dtype, max_total_tokens=args.kv_tokens
        )
        engine.generate(["warm up"] * 4, {"max_new_tokens": 4})
        return engine

    def round(self) -> tuple[float, int]:
        """Seconds and tokens of one round."""
        return self.pool.submit(self._round).result()

    def _round(self) -> tuple[float, int]:
        engine, args = self.engine, self.args
        params = {"max_new_tokens": args.tokens, "ignore_eos": True, "temperature": 1.0}
        ids = [engine.add_request(f"Request {i}: hello", params) for i in range(args.streams)]
        t0, tokens = time.perf_counter(), 0
        steps = 0
        while engine.has_unfinished():
            tokens += sum(len(d.token_ids) for d in engine.step())
            steps += 1
        seconds = time.perf_counter() - t0
        print(f"alone: {steps} steps, mean step {1000 * seconds / steps:.2f} ms, "
              f"{tokens / seconds:.0f} tok/s")  # fmt: skip
        for rid in ids:
            engine.release(rid)
        return seconds, tokens

    def close(self) -> None:
        """Free the engine."""
        self.pool.submit(self.engine.shutdown).result()
        self.pool.shutdown()


async def through_server(url: str, args) -> tuple[float, int]:
    """Seconds and tokens for the requests as concurrent streams over HTTP (one round).

    Each round has a fresh client: httpx spreads requests on reused pooled connections over
    much longer than on new ones, which would measure the client, not the server.
    """
    body = {"model": "m", "max_tokens": args.tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    limits = httpx.Limits(max_connections=args.streams + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        for _ in range(2):  # warm up
            await http.post("/v1/completions", json={**body, "prompt": "warm up", "stream": False})

        async def one(i: int) -> int:
            usage = 0
            payload = {**body, "prompt": f"Request {i}: hello"}
            async with http.stream("POST", "/v1/completions", json=payload) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"choices":[]' in line:
                        usage = json.loads(line[6:])["usage"]["completion_tokens"]
            return usage

        before = _scrape((await http.get("/metrics")).text)
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(args.streams))))
        seconds = time.perf_counter() - t0
        after = _scrape((await http.get("/metrics")).text)
    d = {k: after[k] - before[k] for k in after}
    print(f"server: {d['engine_steps_total']:.0f} steps, mean step "
          f"{1000 * d['engine_step_seconds_total'] / d['engine_steps_total']:.2f} ms, "
          f"engine busy {100 * d['engine_step_seconds_total'] / seconds:.0f}% of the run, "
          f"mean inter-token latency {1000 * d['itl_sum'] / d['itl_count']:.2f} ms, "
          f"{tokens / seconds:.0f} tok/s")  # fmt: skip
    return seconds, tokens


def _scrape(text: str) -> dict[str, float]:
    """The few series the comparison needs, from Prometheus text."""
    names = {"lowbit_engine_steps_total": "engine_steps_total",
             "lowbit_engine_step_seconds_total": "engine_step_seconds_total",
             "lowbit_inter_token_latency_seconds_sum": "itl_sum",
             "lowbit_inter_token_latency_seconds_count": "itl_count"}  # fmt: skip
    out = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in names:
            out[names[name]] = float(line.split()[-1])
    return out


def main() -> None:
    """Run both and print the comparison."""
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", default=None, help="default: a tiny random Llama")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--kv-tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the random model")
    p.add_argument("--layers", type=int, default=2, help="layers of the random model")
    p.add_argument("--stream-interval", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (both runs)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each; the best one counts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the server process
    if args.model_path is None:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
        from tiny import make_tiny_model

        args.model_path = tempfile.mkdtemp()
        h = args.hidden
        make_tiny_model(args.model_path, "llama", hidden_size=h, intermediate_size=3 * h,
                        num_hidden_layers=args.layers, num_attention_heads=h // 32,
                        num_key_value_heads=h // 64)  # fmt: skip
    alone, by_engine = Alone(args), []
    if args.device != "cpu":  # two engines would not fit in one GPU: the baseline goes first
        by_engine = [alone.round() for _ in range(args.rounds)]
        alone.close()
        alone = None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lowbit.launch_server", "--model-path", args.model_path,
           "--port", str(port), "--served-model-name", "m", "--device", args.device,
           "--dtype", args.dtype, "--max-total-tokens", str(args.kv_tokens),
           "--stream-interval", str(args.stream_interval), "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    by_server = []
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with status {server.returncode}")
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        # Rounds alternate, so that a load from other jobs weighs on both sides alike.
        for _ in range(args.rounds):
            if alone is not None:
                by_engine.append(alone.round())
            by_server.append(asyncio.run(through_server(url, args)))
    finally:
        server.terminate()
        server.wait()
        if alone is not None:
            alone.close()
    s0, t0 = min(by_engine)  # the best round of each
    s1, t1 = min(by_server)
    print(f"engine.step() alone: {t0} tokens in {s0:.2f} s = {t0 / s0:.0f} tok/s")
    print(f"{args.streams} HTTP streams: {t1} tokens in {s1:.2f} s = {t1 / s1:.0f} tok/s")
    print(f"server / engine alone: {(t1 / s1) / (t0 / s0):.2f}")


if __name__ == "__main__":
    main()
