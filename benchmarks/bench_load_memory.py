"""Peak GPU memory while loading with online quantization vs a plain bf16 load.

Writes a Llama-3-8B-shaped bf16 checkpoint with fewer layers (random weights) to a scratch dir,
then for each method builds an Engine and records `torch.cuda.max_memory_allocated` over the load
and the memory the weights hold afterwards. The bound checked (issue: online quantization):
peak ≤ final quantized weights + largest single full-precision tensor + 10%.

    python benchmarks/bench_load_memory.py --layers 8 --out benchmarks/results/load_memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def write_checkpoint(path: Path, layers: int, device: str = "cuda") -> int:
    """Random bf16 weights in HF names, a file per layer; returns the largest tensor's bytes."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = transformers.LlamaConfig(num_hidden_layers=layers, **LLAMA3_8B)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)
    H, inter, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    rnd = lambda *s: (torch.randn(*s, device=device) * 0.02).to(torch.bfloat16).cpu()
    ones = torch.ones(H, dtype=torch.bfloat16)
    embed = {"model.embed_tokens.weight": rnd(V, H), "model.norm.weight": ones.clone()}
    save_file({**embed, "lm_head.weight": rnd(V, H)}, path / "model-embed.safetensors")
    for i in range(layers):
        p = f"model.layers.{i}."
        save_file({
            p + "self_attn.q_proj.weight": rnd(H, H), p + "self_attn.k_proj.weight": rnd(kv, H),
            p + "self_attn.v_proj.weight": rnd(kv, H), p + "self_attn.o_proj.weight": rnd(H, H),
            p + "mlp.gate_proj.weight": rnd(inter, H), p + "mlp.up_proj.weight": rnd(inter, H),
            p + "mlp.down_proj.weight": rnd(H, inter),
            p + "input_layernorm.weight": ones.clone(),
            p + "post_attention_layernorm.weight": ones.clone(),
        }, path / f"model-{i:03d}.safetensors")  # fmt: skip
    return V * H * 2


def measure(path: Path, **kw) -> dict:
    """Load once; peak allocated during the load and what stays allocated after it."""
    import lowbit

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    engine = lowbit.Engine(str(path), device="cuda", max_total_tokens=256,
                           max_num_batched_tokens=64, disable_cuda_graph=True, **kw)  # fmt: skip
    seconds = time.perf_counter() - t
    kv = sum(c.k.numel() * c.k.element_size() * 2 for c in engine.runner.kv_caches)
    out = {
        "peak_GiB": (torch.cuda.max_memory_allocated() - base) / 2**30,
        "weights_GiB": (torch.cuda.memory_allocated() - base - kv) / 2**30,
        "load_s": seconds,
    }
    engine.shutdown()
    del engine
    return out


def main() -> None:
    """Run every method that exists on this device and print a table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/load_memory.json")
    ap.add_argument("--methods", nargs="*", default=[
        "bf16", "quantization=fp8", "quantization=w8a8_int8", "quantization=w4a16",
        "quantization=bitsandbytes", "torchao_config=int8wo", "torchao_config=int8dq",
        "torchao_config=int4wo-128", "torchao_config=fp8dq-per_row",
    ])  # fmt: skip
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        largest = write_checkpoint(Path(d), args.layers)
        for m in args.methods:
            kw = {} if m == "bf16" else dict([m.split("=")])
            try:
                r = measure(Path(d), **kw)
            except Exception as e:  # a method missing on this build is reported, not fatal
                rows[m] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{m:32s} error: {rows[m]['error'][:120]}")
                continue
            bound = (r["weights_GiB"] + largest / 2**30) * 1.10
            r["bound_GiB"], r["within_bound"] = bound, r["peak_GiB"] <= bound
            rows[m] = r
            print(
                f"{m:32s} peak {r['peak_GiB']:6.2f} GiB  weights {r['weights_GiB']:6.2f} GiB  "
                f"bound {bound:6.2f}  ok={r['within_bound']}  load {r['load_s']:.1f}s"
            )
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "layers": args.layers}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
