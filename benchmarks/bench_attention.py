"""Paged decode attention alone: µs a call on Llama-3-8B heads, per launch config.

    python benchmarks/bench_attention.py [--batches 1,64] [--contexts 192,1024,4096]
        [--variants "default;bn=128;bn=256,warps=8,stages=1"] [--out DIR]

Each (variant, batch, context, cache dtype) builds a paged cache of random K/V (block size 16,
shuffled blocks), then times a CUDA graph of 32 calls over 32 distinct caches (one a layer, as
in a decode step) and reports µs a call. A variant sets the module's knobs for its rows:
bn (BLOCK_N), stages (NUM_STAGES), stages1 (ONE_SPLIT_STAGES: launches of one split), warps
(NUM_WARPS), short (SHORT_CONTEXT), splits (the launch's num_splits; default: num_splits_for).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from benchlib import environment, print_table, save

from lowbit.kernels.triton import paged_decode_attention as pda

KNOBS = {"bn": "BLOCK_N", "stages": "NUM_STAGES", "stages1": "ONE_SPLIT_STAGES",
         "warps": "NUM_WARPS", "short": "SHORT_CONTEXT"}  # fmt: skip
H, HKV, D, BLOCK = 32, 8, 128, 16
LAYERS = 32


def _parse(variant: str) -> tuple[dict[str, int], int | None]:
    """A variant's module knobs and its num_splits."""
    knobs, splits = {}, None
    for item in filter(None, variant.split(",")):
        if item == "default":
            continue
        key, _, value = item.partition("=")
        if key == "splits":
            splits = int(value)
        elif key in KNOBS:
            knobs[KNOBS[key]] = int(value)
        else:
            raise ValueError(f"variant {variant!r}: keys are {[*KNOBS, 'splits']}")
    return knobs, splits


def _time(variant: str, B: int, ctx: int, dtype: torch.dtype) -> float:
    """µs a call: a CUDA graph of LAYERS calls over distinct caches, median of replays."""
    knobs, splits = _parse(variant)
    saved = {k: getattr(pda, k) for k in knobs}
    try:
        for k, v in knobs.items():
            setattr(pda, k, v)
        blocks = B * -(-ctx // BLOCK)
        gen = torch.Generator(device="cuda").manual_seed(0)
        caches = []
        for _ in range(LAYERS):
            kv = torch.randn(2, blocks * BLOCK, HKV, D, device="cuda", generator=gen)
            caches.append((kv[0].to(dtype), kv[1].to(dtype)))
        tables = torch.randperm(blocks, device="cuda", generator=gen).to(torch.int32)
        tables = tables.reshape(B, -1)
        lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)

        def step():
            for k, v in caches:
                pda.paged_decode_attention(q, k, v, tables, lens, BLOCK, D**-0.5,
                                           num_splits=splits)  # fmt: skip

        step()  # compile, allocate counters outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        times = []
        for _ in range(30):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / LAYERS)
        return sorted(times)[len(times) // 2]
    finally:
        for k, v in saved.items():
            setattr(pda, k, v)


def main() -> None:
    """Time every (variant, batch, context, cache dtype); print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--contexts", default="192,1024,4096")
    ap.add_argument("--variants", default="default")
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--out", type=Path, default=None, help="also copy the JSON here")
    args = ap.parse_args()
    dtypes = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
    rows = []
    for variant in args.variants.split(";"):
        for B in [int(b) for b in args.batches.split(",")]:
            for ctx in [int(c) for c in args.contexts.split(",")]:
                for name in args.dtypes.split(","):
                    row = {"variant": variant, "batch": B, "context": ctx, "cache": name}
                    try:
                        row["us"] = _time(variant, B, ctx, dtypes[name])
                    except Exception as e:  # one failing config must not hide the rest
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    print(row, flush=True)
                    rows.append(row)
    print_table([r for r in rows if "us" in r], ["variant", "batch", "context", "cache", "us"])
    path = save("attention", {"env": environment(), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
