"""Where a batch-1 decode step's time goes: per-kernel GPU time of lowbit's decode step.

    python benchmarks/profile_decode.py [--variants fp8,w4a16] [--batch 1] [--steps 8] [--out DIR]

Builds each variant as `bench_decode.py` does (Llama-3-8B shape, dummy weights, CUDA graphs),
prefills one batch, then records --steps decode steps under torch.profiler (CUPTI traces the
kernels inside graph replays). Per variant it prints the wall time a step, the GPU busy time
a step (union of kernel intervals), and each kernel's launches and µs a step, heaviest first.
With PDL a kernel's interval starts while the previous one still runs (it waits in
`griddepcontrol.wait`), so per-kernel times then overlap; `+nopdl` variants attribute cleanly.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_decode import _free, lowbit_decode_flags, make_runner, prefill
from benchlib import environment, save, write_model_dir


def _kernels(prof) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of every GPU kernel the profiler saw, by start time."""
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > 0:
            out.append((e.name, e.time_range.start, e.time_range.end))
    return sorted(out, key=lambda k: k[1])


def _busy(kernels) -> float:
    """µs covered by at least one kernel."""
    total, end = 0.0, float("-inf")
    for _, s, e in kernels:
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def profile_variant(model_dir: Path, variant: str, batch: int, prompt: int, steps: int) -> dict:
    """Wall and GPU time a decode step, and the kernels of one step."""
    with lowbit_decode_flags(variant) as (scheme, flags):
        runner, _, blocks = make_runner(model_dir, scheme, flags, batch, prompt + 2 * steps + 16)
        tok, tables = prefill(runner, batch, prompt, blocks)
        lens = [prompt] * batch
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        for i in range(3 + steps):  # 3 warm-up steps, then `steps` recorded ones
            if i == 3:
                torch.cuda.synchronize()
                prof = torch.profiler.profile(activities=acts)
                prof.__enter__()
                t0 = time.perf_counter()
            lens = [n + 1 for n in lens]
            logits = runner.forward(tok, lens, [1] * batch, tables, logits_at=list(range(batch)))
            tok = logits.argmax(-1)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        prof.__exit__(None, None, None)
        ks = _kernels(prof)
        per = defaultdict(lambda: [0, 0.0])
        for name, s, e in ks:
            per[name][0] += 1
            per[name][1] += e - s
        table = sorted(
            ({"kernel": n[:90], "calls_per_step": c / steps, "us_per_step": t / steps}
             for n, (c, t) in per.items()),
            key=lambda r: -r["us_per_step"],
        )  # fmt: skip
        del runner
    _free()
    return {
        "variant": variant, "batch": batch, "steps": steps,
        "wall_us_per_step": 1e6 * wall / steps,
        "gpu_busy_us_per_step": _busy(ks) / steps,
        "kernel_sum_us_per_step": sum(r["us_per_step"] for r in table),
        "launches_per_step": len(ks) / steps, "kernels": table,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="bf16,fp8,w4a16,w4a16+nopdl")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, default=None, help="also copy the JSON here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "llama3-8b-shape")
        for variant in args.variants.split(","):
            r = profile_variant(model_dir, variant, args.batch, args.prompt, args.steps)
            rows.append(r)
            print(
                f"\n== {variant} B={args.batch}: wall {r['wall_us_per_step']:.0f} µs/step, "
                f"GPU busy {r['gpu_busy_us_per_step']:.0f}, kernel sum "
                f"{r['kernel_sum_us_per_step']:.0f}, {r['launches_per_step']:.0f} launches"
            )
            for k in r["kernels"][: args.top]:
                print(f"  {k['us_per_step']:8.1f} µs  {k['calls_per_step']:6.1f}×  {k['kernel']}")
            save("profile_decode", {"env": environment(), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
