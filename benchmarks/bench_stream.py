"""The floor of one batch-1 GEMV: how long one kernel takes to read N bytes and do nothing else.

    python benchmarks/bench_stream.py [--sizes o4,qkv4,...] [--out DIR]

A batch-1 decode step is ~300 kernels that each stream a weight once; their time over bytes /
2.99 TB/s is the fixed cost a GEMV design cannot go below (launch, the first bytes' latency, the
last program's tail). Each kernel here reads every 32-bit word of a buffer the size of one
Llama-3-8B linear's weight (+ scales) in a given format and writes one word a program (so the
loads are not dead), timed as `bench_gemm.py` times a GEMM: a CUDA graph that runs it once per
buffer copy (copies together larger than L2), PDL on as in decode. Shapes of the grid:

- `loop`: P programs, each a contiguous range of whole BLOCK-word tiles, `unroll` tiles' loads
  issued together an iteration;
- `flat`: one program a BLOCK-word tile (no loop: every load of a program issued at once).

The table gives µs, GB/s and µs over bytes / 2.99 TB/s for each size and grid; compare with
`bench_gemm.py --ms 1` run in the same call.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import triton
import triton.language as tl
from benchlib import PEAK_BW, ROTATE_BYTES, environment, graph_us, print_table, save

from lowbit.kernels.triton.common import pdl, pdl_enter

# bytes of one Llama-3-8B linear's weight: int4 group 128 (codes + bf16 scales), fp8 (+ fp32
# row scales), bf16; and the bf16 lm_head
SIZES = {
    "o4": 4096 * 4096 // 2 + 4096 * 32 * 2,
    "qkv4": 6144 * 4096 // 2 + 6144 * 32 * 2,
    "down4": 4096 * 14336 // 2 + 4096 * 112 * 2,
    "gate_up4": 28672 * 4096 // 2 + 28672 * 32 * 2,
    "o8": 4096 * 4096 + 4096 * 4,
    "qkv8": 6144 * 4096 + 6144 * 4,
    "down8": 4096 * 14336 + 4096 * 4,
    "gate_up8": 28672 * 4096 + 28672 * 4,
    "lm_head16": 128256 * 4096 * 2,
}


@triton.jit
def _loop_kernel(src, out, n, per, BLOCK: tl.constexpr, UNROLL: tl.constexpr,
                 PDL: tl.constexpr):  # fmt: skip
    pdl_enter(PDL)
    p = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(0, per, BLOCK * UNROLL):
        for u in tl.static_range(UNROLL):  # UNROLL tiles' loads in flight at once
            start = p * per + i + u * BLOCK
            acc ^= tl.load(src + start + offs, mask=start + offs < n, other=0)
    tl.store(out + p, tl.reduce(acc, 0, _xor))


@triton.jit
def _flat_kernel(src, out, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    p = tl.program_id(0)
    offs = p * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(src + offs, mask=offs < n, other=0)
    tl.store(out + p, tl.reduce(w, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def _launch(kind: str, src: torch.Tensor, out: torch.Tensor, cfg: dict) -> None:
    n = src.numel()
    block, warps = cfg["block"], cfg["warps"]
    if kind == "flat":
        _flat_kernel[(triton.cdiv(n, block),)](
            src, out, n, BLOCK=block, **pdl(src.device), num_warps=warps
        )
        return
    programs = cfg["programs"]
    tile = block * cfg["unroll"]
    per = triton.cdiv(triton.cdiv(n, programs), tile) * tile
    _loop_kernel[(triton.cdiv(n, per),)](
        src, out, n, per, BLOCK=block, UNROLL=cfg["unroll"], **pdl(src.device),
        num_warps=warps,
    )  # fmt: skip


def buffers(nbytes: int) -> list[torch.Tensor]:
    """Copies of an `nbytes` buffer, together larger than L2."""
    return [
        torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
        for _ in range(max(2, ROTATE_BYTES // nbytes + 1))
    ]


def bench(kind: str, name: str, copies: list[torch.Tensor], cfg: dict) -> dict:
    """Median µs of one read of each copy with this grid (one graph over the copies)."""
    n = copies[0].numel()
    nbytes = 4 * n
    out = torch.empty(triton.cdiv(n, 256), dtype=torch.int32, device="cuda")
    us = graph_us(lambda c: _launch(kind, c, out, cfg), copies)
    floor = nbytes / PEAK_BW * 1e6
    cfg_s = ",".join(f"{k}={v}" for k, v in cfg.items())
    return {"size": name, "MB": nbytes / 1e6, "kind": kind, "config": cfg_s, "us": us,
            "gbps": nbytes / us / 1e3, "over_us": us - floor}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"of {list(SIZES)}")
    ap.add_argument("--programs", default="132,264,528,1056,2112")
    ap.add_argument("--out", type=Path, default=None, help="also copy the JSON here")
    args = ap.parse_args()
    configs = [("flat", {"block": b, "warps": w}) for b, w in itertools.product(
        (1024, 2048, 4096, 8192), (4, 8))]  # fmt: skip
    configs += [
        ("loop", {"programs": p, "block": b, "warps": w, "unroll": u})
        for p, b, w, u in itertools.product(
            [int(p) for p in args.programs.split(",")], (1024, 2048), (4, 8), (1, 4)
        )
    ]
    rows, env = [], environment()
    for name in args.sizes.split(","):
        best, copies = None, buffers(SIZES[name])
        for kind, cfg in configs:
            r = bench(kind, name, copies, cfg)
            rows.append(r)
            best = r if best is None or r["us"] < best["us"] else best
        del copies
        torch.cuda.empty_cache()
        print(f"{name}: best {best['kind']} {best['config']} {best['us']:.2f} us "
              f"({best['gbps']:.0f} GB/s, +{best['over_us']:.2f} us)", flush=True)  # fmt: skip
        save("stream", {"env": env, "rows": rows}, args.out)
    print_table(rows, ["size", "MB", "kind", "config", "us", "gbps", "over_us"])
    print(f"wrote {save('stream', {'env': env, 'rows': rows}, args.out)}")


if __name__ == "__main__":
    main()
