"""lowbit vs llm-compressor: W4A16 GPTQ / AWQ / RTN on the same model and calibration tokens.

Both tools get identical calibration windows (lowbit's built-in standard-library text, tokenized
once); both exports are loaded back by transformers' own compressed-tensors code and scored on
the same held-out windows against the original model (mean / p99 KL, top-1, perplexity).

Needs llm-compressor (not a lowbit dependency), e.g. in a separate venv:

    PYTHONPATH=. /work/qvenv/bin/python scripts/compare_llmcompressor.py [--model DIR] [--json]

Without --model it builds a small random Llama (hidden 256, 4 layers, 1024-token BPE).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowbit.tools.eval import eval_windows, evaluate, hf_scorer  # noqa: E402
from lowbit.tools.textdata import calibration_windows  # noqa: E402

CASES = (  # (label, lowbit method, llm-compressor recipe name)
    ("RTN W4A16 (g128, sym)", "w4a16-rtn", "rtn"),
    ("GPTQ W4A16 (g128, sym)", "w4a16-gptq", "gptq"),
    ("AWQ W4A16 (g128, asym)", "w4a16-awq", "awq"),
)


TRAIN_MODULES = ("inspect", "subprocess", "tarfile", "pathlib", "pickle", "threading")


def _train(model, tok, steps: int, seq_len: int = 128, batch: int = 8) -> None:
    """A few hundred AdamW steps on standard-library text that is neither calibration nor eval
    text, so the model's distributions look like a language model's rather than noise."""
    from lowbit.tools.textdata import _stdlib_text

    ids = torch.tensor(tok(_stdlib_text(TRAIN_MODULES))["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([ids[s : s + seq_len] for s in starts])  # (B, T)
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss.item():.3f}", file=sys.stderr)
    model.eval()


def make_model(path: Path, train_steps: int) -> None:
    """A small Llama with a BPE tokenizer: random (as tests/conftest.py), or briefly trained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lowbit.tools.textdata import builtin_calibration_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([builtin_calibration_text()[:200_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")  # fmt: skip
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    if train_steps:
        _train(model, fast, train_steps)
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.normal_(0, 0.08)
    model.save_pretrained(path)


def _recipe(name: str):
    """llm-compressor's own recipe for the method (its defaults otherwise)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if name == "rtn":
        return QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    if name == "gptq":
        return GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    from llmcompressor.modifiers.transform.awq import AWQModifier

    quant = QuantizationModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"])
    return [AWQModifier(duo_scaling=True), quant]


def run_llmcompressor(src: Path, out: Path, recipe: str, wins: list[list[int]]) -> float:
    """Quantize with llm-compressor's oneshot on exactly these windows; returns seconds."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins cached activations, which fails without a GPU.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": wins, "attention_mask": [[1] * len(w) for w in wins]})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=_recipe(recipe), num_calibration_samples=len(wins),
            max_seq_length=len(wins[0]), shuffle_calibration_samples=False)  # fmt: skip
    secs = time.perf_counter() - t0
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return secs


def score(src: Path, export: Path, wins) -> dict:
    """Eval of an export (loaded by transformers + compressed-tensors) against the original."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    return evaluate(hf_scorer(model), wins, hf_scorer(ref)).to_dict()


def main() -> int:
    """Quantize with both tools, score both, print a markdown table (or JSON)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="full-precision HF dir (default: tiny random)")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--workdir", default=None)
    ap.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="without --model: train the small model this many steps first",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    import lowbit

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lowbit-vs-llmc-"))
    src = Path(args.model) if args.model else work / "src"
    if args.model is None and not src.exists():
        make_model(src, args.train_steps)
    tok = AutoTokenizer.from_pretrained(src)
    calib = calibration_windows(tok, None, args.num_samples, args.seq_len)
    held = eval_windows(tok, None, args.eval_tokens, args.seq_len)
    rows = []
    for label, method, recipe in CASES:
        lb_out, lc_out = work / f"lowbit-{method}", work / f"llmc-{recipe}"
        t0 = time.perf_counter()
        lowbit.quantize(
            str(src),
            str(lb_out),
            method,
            num_samples=args.num_samples,
            seq_len=args.seq_len,
            overwrite=True,
            progress=False,
            max_kl=1e9,
            max_ppl_ratio=1e9,
        )  # fmt: skip  (compare, not gate)
        lb_secs = time.perf_counter() - t0  # includes lowbit's own eval gate
        lc_secs = run_llmcompressor(src, lc_out, recipe, calib)
        rows.append({"case": label, "lowbit_s": lb_secs, "llmcompressor_s": lc_secs,
                     "lowbit": score(src, lb_out, held),
                     "llmcompressor": score(src, lc_out, held)})  # fmt: skip
    (work / "results.json").write_text(json.dumps(rows, indent=2))  # llm-compressor logs to stdout
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"model {src} · calib {args.num_samples}×{args.seq_len} tokens (same windows) · "
          f"eval {held and len(held) * (len(held[0]) - 1)} held-out tokens\n")  # fmt: skip
    print("| method | tool | mean KL | p99 KL | top-1 | ppl (orig) | time s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for tool in ("lowbit", "llmcompressor"):
            e = r[tool]
            print(f"| {r['case']} | {tool} | {e['kl_mean']:.5f} | {e['kl_p99']:.4f} | "
                  f"{e['top1_agreement']:.4f} | {e['perplexity']:.2f} "
                  f"({e['reference_perplexity']:.2f}) | {r[tool + '_s']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
