"""Train lowbit's bundled demo model: a tiny Llama with its own byte-level BPE tokenizer.

Everything it learns from ships with every Python install: the standard library's `.py` sources
(test folders and site-packages left out). One run builds the tokenizer, the token streams, trains
the model and writes a `save_pretrained` directory in bf16 safetensors plus `train_log.json`.

The committed `lowbit/demo_model/` was made on one H100 (Python 3.12, torch 2.11,
transformers 5.17) with exactly (the flags equal today's defaults):

    PYTHONUNBUFFERED=1 python3 scripts/train_demo_model.py --out "$OUT" --train-seconds 400 \
        --dropout 0.3

It ran beside four other settings on the same GPU (dropout 0, 0.1, 0.2, and 0.2 with lr 1e-3);
dropout 0.3 gave the lowest held-out loss. On a CPU everything runs too, slowly (the full run
takes hours there; raise --train-seconds); a smoke run that checks the whole path:

    python scripts/train_demo_model.py --out /tmp/demo --device cpu --max-steps 3 --limit-files 20
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F

START = time.monotonic()

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]

# The template writes BOS itself (chat prompts are tokenized without special tokens) and closes
# every turn with EOS, so a reply ends where the model emits </s>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Texts that must survive encode -> decode byte for byte: code, whitespace runs, CRLF, Unicode.
ROUND_TRIP_TEXTS = [
    "def f(x):\n\tif x:\r\n        return {'a': [1, 2.5e-3]}  # done\n\n\n",
    "  leading and trailing spaces  ",
    "héllo wörld — naïve café, 日本語のテキスト, 🐍🚀 emoji, Ωμέγα, עברית, \u200b zero-width",
    "",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the ones the committed model was trained with."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for the model files and train_log.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--limit-files", type=int, default=0, help="use only N source files (smoke)")
    p.add_argument("--heldout-percent", type=float, default=3.0)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-position", type=int, default=1024)
    p.add_argument("--chat-examples", type=int, default=4000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.3, help="residual dropout, training only")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--train-seconds", type=float, default=400.0, help="wall-clock training cap")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=400_000)
    p.add_argument("--patience", type=int, default=3, help="evals without gain before decay")
    p.add_argument("--min-delta", type=float, default=0.004)
    p.add_argument("--decay-at", type=int, default=0, help="start the decay at this step (0: auto)")
    p.add_argument("--decay-fraction", type=float, default=0.25)
    p.add_argument("--min-decay-steps", type=int, default=300)
    p.add_argument("--max-bytes", type=int, default=20_000_000, help="limit on model.safetensors")
    return p.parse_args(argv)


def log(msg: str) -> None:
    """Print a line stamped with seconds since start."""
    print(f"[{time.monotonic() - START:7.1f}s] {msg}", flush=True)


def stdlib_sources(limit: int) -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib's .py files, sorted; tests and site-packages skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        # Test suites are mostly fixtures and near-duplicate code; site-packages is not stdlib.
        skip = {"site-packages", "dist-packages", "__pycache__", "idle_test", "tests"}
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith("test")]
        if any(part.startswith("test") for part in rel_dir.parts):
            continue
        paths += [rel_dir / f for f in filenames if f.endswith(".py") and not f.startswith("test_")]
    paths.sort(key=lambda p: p.as_posix())
    if limit:
        # Spread a small sample over the whole tree rather than the first few folders.
        paths = paths[:: max(1, len(paths) // limit)][:limit]
    out = []
    for rel in paths:
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue  # a handful of files declare other encodings; dropping them keeps it simple
        if text.strip():
            out.append((rel.as_posix(), text))
    return out


def is_heldout(rel: str, percent: float) -> bool:
    """A fixed split by a hash of the path, so it does not shift when other files come and go."""
    h = int.from_bytes(hashlib.md5(rel.encode()).digest()[:4], "little")
    return (h % 10_000) < percent * 100


def function_examples(sources: list[tuple[str, str]], n: int, seed: int) -> list[list[dict]]:
    """Chat conversations 'write function X: <docstring line>' -> its source, from the stdlib."""
    found = []
    for rel, text in sources:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue  # lib2to3 fixtures and the like are not valid for this Python
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if node.name.startswith("_") or not doc or not doc.strip():
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            body = textwrap.dedent("".join(lines[first - 1 : node.end_lineno])).rstrip() + "\n"
            if body.count("\n") > 40 or len(body) > 1500:
                continue  # keep replies short enough to fit a training window whole
            prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
            sig = f"{prefix} {node.name}({ast.unparse(node.args)})"
            ask = f"Write a Python function `{sig}`: {doc.strip().splitlines()[0]}"
            found.append((rel, node.lineno, ask, body))
    random.Random(seed).shuffle(found)
    return [
        [{"role": "user", "content": ask}, {"role": "assistant", "content": body}]
        for _, _, ask, body in found[:n]
    ]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-split, no normalizer) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # No normalizer: every byte sequence must come back exactly as it went in.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    bos = tok.token_to_id("<s>")
    # Llama-style: every encoded sequence starts with <s>; ByteLevel offsets are kept unchanged.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
            ),
        ]
    )
    return tok


def wrap_tokenizer(tok, max_len: int):
    """The tokenizers object as a transformers PreTrainedTokenizerFast with a chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=max_len,
        chat_template=CHAT_TEMPLATE,
    )
    return fast


def check_tokenizer(fast, samples: list[str]) -> None:
    """Fail loudly unless text round-trips exactly and the chat template renders."""
    for text in ROUND_TRIP_TEXTS + samples:
        ids = fast(text, add_special_tokens=False)["input_ids"]
        back = fast.decode(ids)
        assert back == text, f"round trip changed {text[:60]!r} into {back[:60]!r}"
        with_bos = fast(text)["input_ids"]
        assert with_bos[:1] == [fast.bos_token_id], "BOS is not prepended"
        assert fast.decode(with_bos, skip_special_tokens=True) == text
    chat = fast.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<s><|user|>\nhi</s>\n<|assistant|>\n", repr(chat)
    ids = fast(chat, add_special_tokens=False)["input_ids"]
    assert ids[0] == fast.bos_token_id and fast.convert_ids_to_tokens(ids[1]) == "<|user|>"


def token_stream(tok, docs: list[str], bos: int, eos: int, add_bos: bool) -> torch.Tensor:
    """All documents' ids in one flat tensor, each document wrapped as [<s>] ids </s>."""
    encs = tok.encode_batch(docs, add_special_tokens=False)
    ids: list[int] = []
    for enc in encs:
        if add_bos:
            ids.append(bos)
        ids += enc.ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def build_model(args: argparse.Namespace, vocab: int, fast):
    """A LlamaForCausalLM of the demo size, in float32 (autocast gives bf16 compute on GPU)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads,
        hidden_act="silu",
        max_position_embeddings=args.max_position,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    return model


def add_dropout(model, p: float) -> list:
    """Dropout on every residual branch and the embeddings; returns the hooks to remove later.

    Llama has no dropout of its own, but a few million tokens seen for many epochs are memorized
    fast without it. Hooks leave the saved model a plain Llama.
    """

    def hook(module, inputs, output):
        """Drop the branch output while training (attention returns a tuple)."""
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, module.training),) + output[1:]
        return F.dropout(output, p, module.training)

    if p <= 0:
        return []
    mods = [model.model.embed_tokens]
    for layer in model.model.layers:
        mods += [layer.self_attn, layer.mlp]
    return [m.register_forward_hook(hook) for m in mods]


def make_optimizer(model, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (norm gains stay undecayed)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    keep = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]
    fused = args.device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def lm_loss(model, chunk: torch.Tensor, amp: bool) -> torch.Tensor:
    """Mean next-token cross-entropy of a [batch, seq+1] chunk."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        logits = model(input_ids=chunk[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int, amp: bool) -> float:
    """Mean loss over fixed held-out windows (every token counted once)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        total += lm_loss(model, chunk, amp).item() * chunk.numel()
        count += chunk.numel()
    model.train()
    return total / count


class Schedule:
    """Warmup, then constant LR (warmup-stable-decay), then a linear decay to zero.

    The training text is only a few million tokens, so how long to train before the model starts
    memorizing is unknown in advance. The decay starts when held-out loss stops improving (or the
    step/time budget is nearly spent) and lasts a fixed fraction of the steps done so far.
    """

    def __init__(self, args: argparse.Namespace):
        """Budget and trigger settings from the command line."""
        self.args = args
        self.warmup = max(1, min(args.warmup_steps, args.max_steps // 10))
        self.decay_start: int | None = None
        self.decay_len = 0

    def start_decay(self, step: int, steps_left_by_time: int) -> None:
        """Begin the final decay at `step` (idempotent)."""
        if self.decay_start is not None:
            return
        a = self.args
        want = max(a.min_decay_steps, int(a.decay_fraction * step))
        self.decay_start = step
        self.decay_len = max(1, min(want, a.max_steps - step, steps_left_by_time))

    def lr(self, step: int) -> float:
        """Learning rate for `step` (0-based)."""
        peak = self.args.lr
        if step < self.warmup:
            return peak * (step + 1) / self.warmup
        if self.decay_start is None:
            return peak
        return peak * max(0.0, 1.0 - (step - self.decay_start) / self.decay_len)

    def done(self, step: int) -> bool:
        """Whether the decay has run its course."""
        return self.decay_start is not None and step >= self.decay_start + self.decay_len


def train(model, train_ids, windows, args: argparse.Namespace) -> dict:
    """Train on random windows of the stream; return stats and leave the best weights loaded."""
    device = torch.device(args.device)
    amp = device.type == "cuda"
    model.to(device).train()
    hooks = add_dropout(model, args.dropout)
    opt = make_optimizer(model, args)
    sched = Schedule(args)
    data = train_ids.to(device)
    windows = windows.to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    span = torch.arange(args.seq_len + 1, device=device)
    best = {"loss": math.inf, "step": 0, "state": None}
    history, recent = [], []
    since_gain = 0
    t0 = time.monotonic()
    step = 0
    while step < args.max_steps and not sched.done(step):
        elapsed = time.monotonic() - t0
        speed = step / elapsed if step else 0.0
        steps_left = int((args.train_seconds - elapsed) * speed) if step else args.max_steps
        # Near the end of the budget the decay must start anyway so it can finish in time.
        if (args.decay_at and step == args.decay_at) or step >= 0.8 * args.max_steps:
            sched.start_decay(step, steps_left)
        if step and elapsed >= 0.8 * args.train_seconds:
            sched.start_decay(step, steps_left)
        if elapsed >= args.train_seconds:
            log("time budget spent; stopping")
            break
        for g in opt.param_groups:
            g["lr"] = sched.lr(step)
        starts = torch.randint(
            0, len(data) - args.seq_len - 1, (args.batch_size,), generator=gen, device=device
        )
        loss = lm_loss(model, data[starts[:, None] + span], amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent.append(loss.detach())
        step += 1
        last = step == args.max_steps or sched.done(step)
        if step % args.eval_every == 0 or last:
            train_loss = torch.stack(recent).mean().item()
            held = evaluate(model, windows, args.batch_size, amp)
            lr = sched.lr(step - 1)
            history.append({"step": step, "lr": lr, "train_loss": train_loss, "heldout": held})
            log(
                f"step {step} lr {lr:.2e} train {train_loss:.4f} heldout {held:.4f} "
                f"({step * args.batch_size * args.seq_len / 1e6:.1f}M tokens)"
            )
            if held < best["loss"] - args.min_delta:
                since_gain = 0
            else:
                since_gain += 1
            if held < best["loss"]:
                # Kept on the side so overfitting after this point cannot spoil the result.
                best = {
                    "loss": held,
                    "step": step,
                    "train_loss": train_loss,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                }
            if since_gain >= args.patience and not args.decay_at and sched.decay_start is None:
                log(f"held-out loss flat for {since_gain} evals: starting the decay")
                sched.start_decay(step, steps_left)
            recent = []
    seconds = time.monotonic() - t0
    for h in hooks:
        h.remove()
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    last_entry = history[-1] if history else {}
    return {
        "steps": step,
        "tokens_seen": step * args.batch_size * args.seq_len,
        "train_seconds": round(seconds, 1),
        "decay_start_step": sched.decay_start,
        "decay_steps": sched.decay_len,
        "final_step_train_loss": last_entry.get("train_loss"),
        "final_step_heldout_loss": last_entry.get("heldout"),
        "best_step": best["step"],
        "train_loss": best.get("train_loss"),
        "heldout_loss": best["loss"],
        "history": history,
    }


def sample(model, fast, prompt: str, device: str) -> str:
    """Greedy continuation of `prompt` (60 new tokens), as the README shows it."""
    model.eval()
    ids = fast(prompt, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=60, do_sample=False)
    return fast.decode(out[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    """Build tokenizer and data, train, save the model directory and its log."""
    import tokenizers
    import transformers

    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True

    sources = stdlib_sources(args.limit_files)
    held = [s for s in sources if is_heldout(s[0], args.heldout_percent)]
    if not held:
        held = sources[-1:]  # tiny smoke runs can miss the hash split entirely
    held_names = {rel for rel, _ in held}
    train_src = [s for s in sources if s[0] not in held_names]
    log(
        f"{len(train_src)} train files ({sum(len(t) for _, t in train_src) / 1e6:.1f} MB), "
        f"{len(held)} held-out files, Python {sys.version.split()[0]}"
    )

    tok = train_tokenizer([t for _, t in train_src], args.vocab_size)
    fast = wrap_tokenizer(tok, args.max_position)
    check_tokenizer(fast, [t[:2000] for _, t in held[:5]])
    log(f"tokenizer: {len(fast)} tokens")

    chats = function_examples(train_src, args.chat_examples, args.seed)
    chat_texts = [fast.apply_chat_template(c, tokenize=False) for c in chats]
    bos, eos = fast.bos_token_id, fast.eos_token_id
    docs = [t for _, t in train_src]
    train_ids = torch.cat(
        [token_stream(tok, docs, bos, eos, True), token_stream(tok, chat_texts, bos, eos, False)]
    )
    held_ids = token_stream(tok, [t for _, t in held], bos, eos, True)
    n_win = max(1, min(args.eval_tokens, len(held_ids) - 1) // args.seq_len)
    windows = held_ids[: n_win * args.seq_len + 1]
    windows = torch.stack(
        [
            windows[i * args.seq_len : (i + 1) * args.seq_len + 1]
            for i in range(n_win)
            if (i + 1) * args.seq_len < len(windows)
        ]
    )
    log(
        f"train stream {len(train_ids) / 1e6:.2f}M tokens ({len(chats)} chat examples), "
        f"held-out {windows.numel() / 1e6:.2f}M tokens in {len(windows)} windows"
    )

    # Round the embedding up to a multiple of 128 so every quantization format's tiling applies.
    vocab = -(-len(fast) // 128) * 128
    model = build_model(args, vocab, fast)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, vocab {vocab}")

    stats = train(model, train_ids, windows, args)
    log(f"best held-out {stats['heldout_loss']:.4f} at step {stats['best_step']}")

    model.to(torch.bfloat16)
    fib = sample(model, fast, "def fibonacci(n):", args.device)
    print(fib, flush=True)
    model.to("cpu").save_pretrained(out, safe_serialization=True)
    # The chat template goes into tokenizer_config.json so readers that know no .jinja file see it.
    fast.save_pretrained(out, save_jinja_files=False)
    special_map = out / "special_tokens_map.json"
    if not special_map.exists():
        special_map.write_text(json.dumps(fast.special_tokens_map, indent=2) + "\n")
    size = (out / "model.safetensors").stat().st_size
    assert size <= args.max_bytes, f"model.safetensors is {size} bytes > {args.max_bytes}"

    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    log_data = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
        "args": vars(args),
        "card": card,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "train_files": len(train_src),
        "heldout_files": len(held),
        "chat_examples": len(chats),
        "train_stream_tokens": len(train_ids),
        "heldout_tokens": windows.numel(),
        "parameters": n_params,
        "safetensors_bytes": size,
        "fibonacci_sample": fib,
        "total_seconds": round(time.monotonic() - START, 1),
        **stats,
    }
    (out / "train_log.json").write_text(json.dumps(log_data, indent=1) + "\n")
    log(f"wrote {out} (model.safetensors {size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
