"""Markdown tables from benchmarks/results/*.json, for RESULTS.md.

python benchmarks/report.py [results_dir]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _md(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of the chosen columns (floats to 3 significant digits or integers)."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    """Print every results file found as markdown."""
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results"
    for name in ("decode", "gemm", "throughput"):
        path = root / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        print(f"### {name}\n\nenv: `{json.dumps(data['env'])}`\n")
        rows = data["rows"]
        if name == "decode":
            cols = ["engine", "variant", "batch", "tok_s", "ms_per_step", "x_hf_eager"]
            print(_md([r for r in rows if "tok_s" in r], cols))
        elif name == "gemm":
            ok = [r for r in rows if "us" in r]
            print(_md(ok, ["shape", "M", "scheme", "us", "tflops", "gbps", "roofline_pct",
                           "speedup_vs_bf16"]))  # fmt: skip
        else:
            print(_md(rows, ["variant", "requests", "seconds", "req_s", "output_tok_s",
                             "total_tok_s"]))  # fmt: skip
        errors = [r for r in rows if "error" in r]
        if errors:
            print("\nerrors:\n" + "\n".join(f"- `{json.dumps(r)}`" for r in errors))
        print()


if __name__ == "__main__":
    main()
