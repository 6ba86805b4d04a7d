"""`lowbit generate | serve | inspect` (more subcommands arrive with their features)."""

from __future__ import annotations

import argparse
import json
import sys

from lowbit.config import LM_HEAD_HELP, QUANT_HELP, TORCHAO_HELP


def _engine_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by subcommands that load a model (SGLang's names)."""
    p.add_argument("--model-path", default=None, help="HF directory or hub id (default: demo)")
    p.add_argument("--quantization", default=None, help=QUANT_HELP)
    p.add_argument("--torchao-config", default=None, help=TORCHAO_HELP)
    p.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help=LM_HEAD_HELP,
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--context-length", type=int, default=None)


def _generate(args: argparse.Namespace) -> int:
    """Print the continuation of each prompt."""
    import lowbit

    params = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
    }  # fmt: skip
    with lowbit.Engine(
        model_path=args.model_path, quantization=args.quantization,
        torchao_config=args.torchao_config, dtype=args.dtype, device=args.device,
        kv_cache_dtype=args.kv_cache_dtype, load_format=args.load_format,
        context_length=args.context_length, quantize_lm_head=args.quantize_lm_head,
    ) as engine:  # fmt: skip
        if args.stream and len(args.prompts) == 1:
            print(args.prompts[0], end="", flush=True)
            for delta in engine.generate_stream(args.prompts[0], params):
                print(delta.text, end="", flush=True)
            print()
            return 0
        for out in engine.generate(list(args.prompts), params):
            if args.json:
                print(json.dumps({"prompt": out.prompt, "text": out.text,
                                  "token_ids": out.outputs[0].token_ids,
                                  "finish_reason": out.outputs[0].finish_reason}))  # fmt: skip
            else:
                print(out.prompt + out.text)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """Print the quantization plan: module → spec → scheme → kernel."""
    from lowbit.quant.inspect import format_plan

    print(format_plan(args.model_path, quantization=args.quantization))
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Perplexity, KL, top-1 and per-layer error of a model against a reference."""
    from lowbit.tools.eval import eval_main

    return eval_main(args)


def _quantize(args: argparse.Namespace) -> int:
    """Calibrated offline quantization and export."""
    from lowbit.tools.quantize.cli import quantize_main

    return quantize_main(args)


def build_parser() -> argparse.ArgumentParser:
    """The `lowbit` command line."""
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from prompts")
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    _engine_flags(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stream", action="store_true", help="print tokens as they come")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.set_defaults(func=_generate)
    sub.add_parser("serve", help="OpenAI-compatible server (python -m lowbit.launch_server)",
                   add_help=False)  # fmt: skip
    ins = sub.add_parser("inspect", help="print the quantization plan without loading weights")
    ins.add_argument("model_path", nargs="?", default=None)
    ins.add_argument("--quantization", default=None)
    ins.set_defaults(func=_inspect)
    ev = sub.add_parser("eval", help="perplexity / KL / top-1 / per-layer error vs a reference")
    ev.add_argument("--model", required=True, help="model to evaluate (dir or hub id)")
    ev.add_argument("--reference", default=None, help="reference model (e.g. the original)")
    ev.add_argument("--data", default=None, help="text or jsonl file (default: built-in text)")
    ev.add_argument("--max-tokens", type=int, default=2048)
    ev.add_argument("--seq-len", type=int, default=512, help="window length")
    ev.add_argument("--dtype", default="auto")
    ev.add_argument("--device", default=None)
    ev.add_argument(
        "--quantization",
        default=None,
        help="quantize --model online (fp8, w8a8_int8, w4a16, …) before evaluating",
    )
    ev.add_argument("--torchao-config", default=None, help="or quantize --model with torchao")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.set_defaults(func=_eval)
    from lowbit.tools.quantize.cli import add_quantize_parser

    add_quantize_parser(sub, _quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lowbit` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        from lowbit.launch_server import main as serve

        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
