"""Time `lowbit quantize --method w4a16-gptq` on a Llama-3-8B-shaped model with dummy weights.

Writes a random bf16 checkpoint of the 8B shape (`--layers` of the 32; the same writer as
bench_load_memory.py), runs lowbit's calibrated quantization on the GPU (calibration, export,
quality gate) and records wall time per phase and peak GPU memory. Random weights make the gate's
verdict meaningless (it may fail); the timing is what this measures (issue 7: ≤ 15 minutes on one
H100 for all 32 layers).

    python benchmarks/bench_quantize.py --layers 32 --out benchmarks/results/quantize_8b.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_load_memory import write_checkpoint  # noqa: E402


def main() -> None:
    """Write the checkpoint, quantize it, print and save the timings."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--method", default="w4a16-gptq")
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test with a small shape")
    ap.add_argument("--out", default="benchmarks/results/quantize_8b.json")
    args = ap.parse_args()
    from lowbit.tools.quantize.api import QualityGateError, quantize

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "src", Path(d) / "out"
        src.mkdir()
        t = time.perf_counter()
        write_checkpoint(src, args.layers, args.device)
        write_s = time.perf_counter() - t
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        try:
            report = quantize(str(src), str(dst), args.method, num_samples=args.num_samples,
                              seq_len=args.seq_len, device=args.device,
                              eval_max_tokens=1024)  # fmt: skip
        except QualityGateError:
            report = json.loads((dst / "quantization_report.json").read_text())
        total = time.perf_counter() - t
    row = {
        "method": args.method, "layers": args.layers, "num_samples": args.num_samples,
        "seq_len": args.seq_len, "total_s": total, "phases_s": report.get("time"),
        "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "write_checkpoint_s": write_s,
        "gate_status_random_weights": report.get("status"),
    }  # fmt: skip
    if args.layers != 32:
        row["calibration_s_per_layer"] = report["time"]["calibration_s"] / args.layers
    meta = {"card": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    print(json.dumps(row, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "result": row}, indent=2))


if __name__ == "__main__":
    main()
