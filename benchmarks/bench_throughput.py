"""Offline throughput: 1,000 synthetic requests with mixed prompt/output lengths through Engine.

    python benchmarks/bench_throughput.py [--requests 1000] [--variants bf16,fp8,w4a16] [--out DIR]

Llama-3-8B shape, dummy weights, greedy, ignore_eos; prompt lengths uniform in [--min-prompt,
--max-prompt], output lengths uniform in [--min-out, --max-out] (seeded). Reports requests/s,
output tok/s and total (prompt + output) tok/s over the whole `Engine.generate` call, which
includes scheduling, sampling and detokenization. Variants: bf16, or an online `--quantization`
method (fp8, w8a8_int8, w4a16, …) over the dummy weights — lowbit's real schemes.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from benchlib import (
    environment,
    fast_dummy_weights,
    print_table,
    save,
    write_model_dir,
)


def run(model_dir: Path, variant: str, args) -> dict:
    """Generate for all requests once; returns the rates."""
    import lowbit
    from lowbit.quant.online import METHODS

    if variant != "bf16" and variant not in METHODS:
        raise ValueError(f"variant {variant!r}: use bf16 or an online method {sorted(METHODS)}")
    rng = random.Random(0)
    prompts = [
        [rng.randrange(3, 128256) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
        for _ in range(args.requests)
    ]
    params = [
        {"temperature": 0, "ignore_eos": True,
         "max_new_tokens": rng.randint(args.min_out, args.max_out)}
        for _ in range(args.requests)
    ]  # fmt: skip
    with fast_dummy_weights():
        engine = lowbit.Engine(
            str(model_dir), load_format="dummy", dtype="bfloat16",
            max_running_requests=args.max_running, max_num_batched_tokens=args.batched_tokens,
            quantization=None if variant == "bf16" else variant,
        )  # fmt: skip
        engine.generate(prompts[:4], params[:4])  # warm up kernels outside the timing
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        engine.shutdown()
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    return {
        "variant": variant, "requests": args.requests, "seconds": dt,
        "req_s": args.requests / dt, "output_tok_s": out_tokens / dt,
        "total_tok_s": (in_tokens + out_tokens) / dt, "output_tokens": out_tokens,
        "prompt_tokens": in_tokens, "max_running": args.max_running,
        "batched_tokens": args.batched_tokens,
    }  # fmt: skip


def main() -> None:
    """Run, print a one-row table, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--variants", default="bf16")
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--min-out", type=int, default=32)
    ap.add_argument("--max-out", type=int, default=256)
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--batched-tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=None, help="also copy the JSON here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "llama3-8b-shape")
        for variant in args.variants.split(","):
            rows.append(run(model_dir, variant, args))
            print(rows[-1], flush=True)
    print_table(rows, ["variant", "requests", "seconds", "req_s", "output_tok_s", "total_tok_s"])
    path = save("throughput", {"env": environment(), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
