"""Shared benchmark pieces: the Llama-3-8B shape, environment facts, tables and JSON, the
quantized plans the decode benchmark runs, and fast dummy weights.

  * `bench_plan(name)` is lowbit's own plan and schemes (the ones a checkpoint or an online
    `--quantization` gets; runs 1–4 used bench-only stand-in schemes over the same dispatch
    kernels); lm_head stays bf16.
  * `fast_dummy_weights()` draws dummy weights on the GPU: the loader's CPU generator takes
    minutes for 8B parameters, device time the benchmarks cannot spend.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
from pathlib import Path

import torch

LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1,
    eos_token_id=2, hidden_act="silu", dtype="bfloat16",
)  # fmt: skip
# Measured on the lent H100 (issue 6): device copy, bf16 matmul, FP8 row-wise _scaled_mm.
PEAK_BW = 2.99e12
PEAK_BF16 = 790e12
PEAK_8BIT = 1224e12
RESULTS = Path(__file__).resolve().parent / "results"
# Weight copies together this large (> 5× the H100's 50 MB L2) are never served from L2.
ROTATE_BYTES = 256 << 20


def graph_us(run, copies: list) -> float:
    """Median µs of `run(copy)` for one copy: a CUDA graph runs it once per copy (warmed up on a
    side stream off the capture: compiles, cuBLAS handles), replayed by triton's do_bench, so
    neither Python nor launch overhead is timed, as in decode."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in copies[:2]:
            run(c)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in copies:
            run(c)
    ms = do_bench(graph.replay, warmup=10, rep=50, return_mode="median") / len(copies)
    del graph
    return ms * 1e3


def write_model_dir(path: Path, num_layers: int = 32) -> Path:
    """config.json of the Llama-3-8B shape plus a word-level tokenizer covering all 128,256 ids."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**LLAMA3_8B, "num_hidden_layers": num_layers}))
    vocab = {f"t{i}": i for i in range(LLAMA3_8B["vocab_size"])}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)
    return path


def environment() -> dict:
    """Card, versions and date for RESULTS.md."""
    import transformers
    import triton

    dev = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {
        "card": dev.name if dev else "cpu",
        "sms": dev.multi_processor_count if dev else 0,
        "memory_gib": round(dev.total_memory / 2**30, 1) if dev else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def save(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write results JSON to benchmarks/results/ (and a copy to out_dir when given)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=1)
    path = RESULTS / f"{name}.json"
    path.write_text(text)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(text)
    return path


def print_table(rows: list[dict], cols: list[str]) -> None:
    """A plain fixed-width table of the chosen columns."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) and abs(v) < 1000 else (
        f"{v:.0f}" if isinstance(v, float) else str(v))  # fmt: skip
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)), flush=True)


# ---- quantized plans over dummy weights ----

BENCH_SCHEMES = ("fp8", "w8a8_int8", "w4a16", "fp8-block", "nvfp4")


def bench_plan(name: str):
    """lowbit's own plan for `name`: an online method (fp8 per-channel W8A8, w8a8_int8, w4a16
    g128 asym), `fp8-block` — DeepSeek-style 128×128 block weights with 1×128 dynamic
    activation groups, the spec of a block-FP8 checkpoint — or `nvfp4`, ModelOpt's W4A16 NVFP4
    (e2m1 codes, fp8 scales per 16, a per-tensor scale). Dummy weights fill the checkpoint-
    layout params; the schemes repack them as they would a loaded checkpoint."""
    from lowbit.quant.online import METHODS, online_plan
    from lowbit.quant.spec import ActQuant, PerBlock, PerGroup, QuantPlan, QuantSpec

    if name in METHODS:
        return online_plan(name)
    if name == "fp8-block":
        act = ActQuant("fp8_e4m3", "dynamic_group", 128)
        spec = QuantSpec("fp8_e4m3", PerBlock(128, 128), "fp8", act=act)
    elif name == "nvfp4":
        spec = QuantSpec("fp4_e2m1", PerGroup(16), "modelopt_nvfp4", global_scale=True)
    else:
        raise ValueError(f"unknown bench scheme {name!r}; use bf16 or one of "
                         f"{BENCH_SCHEMES + tuple(METHODS)}")  # fmt: skip
    return QuantPlan(method=name, description=str(spec),
                     spec_of=lambda module: spec if ".layers." in module else None)  # fmt: skip


# ---- fast dummy weights ----


@torch.no_grad()
def _gpu_dummy_weights(model, plan, seed: int = 0) -> None:
    """Dummy weights drawn on the device: small normals, unit norms, random codes, small scales."""
    from lowbit.layers.linear import LinearBase

    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif "scale" in name.rsplit(".", 1)[-1] and p.dtype.itemsize == 1:  # fp8 block scales
            p.copy_(torch.empty(p.shape, device=p.device).uniform_(0.5, 1.5).to(p.dtype))
        elif "scale" in name.rsplit(".", 1)[-1]:
            p.uniform_(0.5e-3, 1.5e-3)  # keeps dequantized weights ~0.01 like real ones
        elif p.dtype.is_floating_point and p.dtype.itemsize > 1:
            p.normal_(0, 0.02)
        elif p.dtype.is_floating_point:  # fp8 codes
            p.copy_(torch.randn(p.shape, device=p.device).clamp(-8, 8).to(p.dtype))
        else:
            info = torch.iinfo(p.dtype)
            p.random_(info.min, info.max)
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.scheme.process_weights_after_loading(module)


@contextlib.contextmanager
def fast_dummy_weights():
    """Make ModelRunner's load_format='dummy' draw weights on the GPU for this block."""
    import lowbit.engine.runner as runner_mod

    saved = runner_mod.init_dummy_weights
    runner_mod.init_dummy_weights = _gpu_dummy_weights
    try:
        yield
    finally:
        runner_mod.init_dummy_weights = saved
