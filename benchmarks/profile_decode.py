"""Where a batch-1 decode step's time goes: per-kernel GPU time of lowbit's decode step.

    python benchmarks/profile_decode.py [--variants fp8,w4a16] [--batch 1] [--steps 8] [--engine]
        [--out DIR]

Builds each variant as `bench_decode.py` does (Llama-3-8B shape, dummy weights, CUDA graphs),
prefills one batch, then records --steps decode steps under torch.profiler (CUPTI traces the
kernels inside graph replays). Per variant it prints the wall time a step, the GPU busy time
a step (union of kernel intervals), and each kernel's launches and µs a step, heaviest first.
With PDL a kernel's interval starts while the previous one still runs (it waits in
`griddepcontrol.wait`), so per-kernel times then overlap; `+nopdl` variants attribute cleanly.

`--engine` records --steps decode steps of --batch prompts through `lowbit.Engine.generate`
instead (`bench_decode.make_engine`: scheduler, sampler, detokenizer, overlap as served): the
same GPU table, and the host's heaviest operations by self CPU time, to see what the engine adds
to a step beyond the runner loop: generate is profiled for 1 and for 1 + --steps new tokens,
and every figure is the difference divided by --steps (prefill excluded).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_decode import _free, lowbit_decode_flags, make_engine, make_runner, prefill
from benchlib import environment, save, write_model_dir

from lowbit.kernels import dispatch


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
            tok = dispatch.argmax(logits)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        prof.__exit__(None, None, None)
        del runner
    _free()
    ks = _kernels(prof)
    return _table(variant, batch, steps, wall, _busy(ks), ks)


def profile_engine(model_dir: Path, variant: str, batch: int, prompt: int, steps: int) -> dict:
    """`profile_variant` through `Engine.generate` of `batch` prompts, with the host's heaviest
    operations: generate is profiled for 1 and for 1 + `steps` new tokens, and every figure is
    the difference divided by `steps` (the prefill and the first token cancel out, as in
    `bench_decode.engine_decode`)."""
    with lowbit_decode_flags(variant) as (scheme, flags):
        eng = make_engine(model_dir, scheme, flags, batch, prompt + steps + 64)
        ids = torch.randint(3, eng.model_config.vocab_size, (batch, prompt)).tolist()
        params = {"temperature": 0, "ignore_eos": True}
        eng.generate(ids, {**params, "max_new_tokens": 8})  # warm-up
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        runs = []
        for n in (1, 1 + steps):
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=acts) as prof:
                t0 = time.perf_counter()
                eng.generate(ids, {**params, "max_new_tokens": n})
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            runs.append((prof, wall))
        eng.shutdown()
        del eng
    _free()
    (p1, w1), (pn, wn) = runs
    k1, kn = _kernels(p1), _kernels(pn)
    out = _table(variant + " (engine)", batch, steps, wn - w1, _busy(kn) - _busy(k1), kn, k1)
    host = defaultdict(lambda: [0, 0.0])
    for prof, sign in ((pn, 1), (p1, -1)):
        for e in prof.key_averages():
            host[e.key][0] += sign * e.count
            host[e.key][1] += sign * e.self_cpu_time_total
    out["host"] = [
        {"op": k[:90], "calls_per_step": c / steps, "self_cpu_us_per_step": t / steps}
        for k, (c, t) in sorted(host.items(), key=lambda kv: -kv[1][1])[:25]
    ]  # fmt: skip
    return out


def _table(variant, batch, steps, wall, busy, ks, minus=()) -> dict:
    """Wall and GPU busy time a step, and each kernel's launches and µs a step: of kernels `ks`
    less kernels `minus` (another run's)."""
    per = defaultdict(lambda: [0, 0.0])
    for sign, kernels in ((1, ks), (-1, minus)):
        for name, s, e in kernels:
            per[name][0] += sign
            per[name][1] += sign * (e - s)
    table = sorted(
        ({"kernel": n[:90], "calls_per_step": c / steps, "us_per_step": t / steps}
         for n, (c, t) in per.items()),
        key=lambda r: -r["us_per_step"],
    )  # fmt: skip
    return {
        "variant": variant, "batch": batch, "steps": steps,
        "wall_us_per_step": 1e6 * wall / steps,
        "gpu_busy_us_per_step": busy / steps,
        "kernel_sum_us_per_step": sum(r["us_per_step"] for r in table),
        "launches_per_step": (len(ks) - len(minus)) / steps, "kernels": table,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="bf16,fp8,w4a16,w4a16+nopdl")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument(
        "--engine", action="store_true", help="profile through lowbit.Engine.generate instead"
    )
    ap.add_argument("--out", type=Path, default=None, help="also copy the JSON here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "llama3-8b-shape")
        for variant in args.variants.split(","):
            run = profile_engine if args.engine else profile_variant
            r = run(model_dir, variant, args.batch, args.prompt, args.steps)
            rows.append(r)
            print(
                f"\n== {variant} B={args.batch}: wall {r['wall_us_per_step']:.0f} µs/step, "
                f"GPU busy {r['gpu_busy_us_per_step']:.0f}, kernel sum "
                f"{r['kernel_sum_us_per_step']:.0f}, {r['launches_per_step']:.0f} launches"
            )
            for k in r["kernels"][: args.top]:
                print(f"  {k['us_per_step']:8.1f} µs  {k['calls_per_step']:6.1f}×  {k['kernel']}")
            for h in r.get("host", [])[: args.top]:
                print(f"  host {h['self_cpu_us_per_step']:8.1f} µs  {h['calls_per_step']:6.1f}×  "
                      f"{h['op']}")  # fmt: skip
            save("profile_decode", {"env": environment(), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
