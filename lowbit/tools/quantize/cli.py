"""`lowbit quantize` flags (argparse) and entry point."""

from __future__ import annotations

import argparse
import json
import sys

from lowbit.tools.quantize.methods import METHODS
from lowbit.tools.quantize.writers import FORMATS


def methods_table() -> str:
    """`--method` choices with their formats and quality-gate thresholds."""
    lines = ["methods (format choices; gate: max mean KL, max perplexity ratio):"]
    for m in METHODS.values():
        lines.append(f"  {m.name:<13} {'|'.join(m.formats):<32} KL<={m.max_kl:<5} "
                     f"ppl<={m.max_ppl_ratio}x")  # fmt: skip
    return "\n".join(lines)


def add_quantize_parser(sub, func) -> None:
    """Register the `quantize` subcommand on `sub` (argparse subparsers)."""
    q = sub.add_parser(
        "quantize",
        help="calibrated offline quantization and export",
        description="Quantize a full-precision checkpoint layer by layer, export it, and gate "
        "it on held-out text (exit 3 and QUANTIZATION_FAILED in the export when it fails).",
        epilog=methods_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--model-path", required=True, help="full-precision HF directory or hub id")
    q.add_argument("--export-dir", required=True, help="where the quantized checkpoint goes")
    q.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    q.add_argument(
        "--calib-data",
        default=None,
        help="text or jsonl ({'text': ...}) file; default: built-in offline text",
    )
    q.add_argument("--num-samples", type=int, default=128)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="int methods: group size along in_features, -1 = per channel",
    )
    q.add_argument(
        "--ignore",
        nargs="*",
        default=[],
        metavar="PATTERN",
        help="modules to keep unquantized: exact name, wildcard or 're:REGEX'",
    )
    q.add_argument(
        "--format",
        default=None,
        choices=FORMATS,
        help="output layout (default: compressed-tensors; modelopt_* → modelopt)",
    )
    q.add_argument("--act-order", nargs="?", const="group", default=None,
                   choices=["none", "static", "group"],
                   help="GPTQ column order: static (default: act-order with fixed groups), "
                        "group (bare flag: groups in act-order, writes g_idx) or none")  # fmt: skip
    q.add_argument("--overwrite", action="store_true", help="replace an existing export dir")
    q.add_argument("--checkpoint-save-path", default=None, help="save the calibration state")
    q.add_argument(
        "--checkpoint-restore-path",
        default=None,
        help="restore a saved calibration state and skip calibration",
    )
    q.add_argument("--device", default=None)
    q.add_argument("--eval-max-tokens", type=int, default=2048)
    q.add_argument("--max-kl", type=float, default=None, help="override the method's gate")
    q.add_argument("--max-ppl-ratio", type=float, default=None, help="override the gate")
    q.add_argument("--min-top1", type=float, default=None, help="also gate on top-1 agreement")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(func=func)


def quantize_main(args: argparse.Namespace) -> int:
    """Run `lowbit quantize`; exit 3 when the quality gate fails, 2 on bad input."""
    from lowbit.tools.quantize.api import QualityGateError, quantize

    try:
        report = quantize(
            args.model_path, args.export_dir, args.method, calib_data=args.calib_data,
            num_samples=args.num_samples, seq_len=args.seq_len, group_size=args.group_size,
            ignore=args.ignore, format=args.format, overwrite=args.overwrite,
            act_order=args.act_order, checkpoint_save_path=args.checkpoint_save_path,
            checkpoint_restore_path=args.checkpoint_restore_path, device=args.device,
            eval_max_tokens=args.eval_max_tokens, max_kl=args.max_kl,
            max_ppl_ratio=args.max_ppl_ratio, min_top1=args.min_top1,
        )  # fmt: skip
    except QualityGateError as e:
        print(f"lowbit quantize: FAILED: {e}", file=sys.stderr)
        return 3
    except FileExistsError as e:
        print(f"lowbit quantize: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        ev = report["eval"]
        print(f"exported {args.export_dir} ({report['method']}, {report['format']}): "
              f"KL {ev['kl_mean']:.5f} (p99 {ev['kl_p99']:.5f}), top-1 "
              f"{ev['top1_agreement']:.4f}, ppl {ev['perplexity']:.3f} "
              f"(original {ev['reference_perplexity']:.3f}) — gate passed")  # fmt: skip
    return 0
