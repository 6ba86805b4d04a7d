"""Decode tok/s of a Llama-3-8B-shaped model (dummy weights) per scheme and batch size.

    python benchmarks/bench_decode.py [--batches 1,16,64,256] [--variants ...] [--out DIR]

Each lowbit variant builds a ModelRunner (CUDA graphs unless the variant says eager), prefills
B prompts of --prompt tokens, then times --steps greedy decode steps (forward + argmax + the
next step's metadata), reporting B × steps / seconds. Baseline in the same run: HF transformers
eager (same config, random bf16 weights, sdpa, DynamicCache), and torchao int4wo-128 with a
static cache under torch.compile (batch sizes --torchao-batches; skipped when torchao is not
installed — carry its wheel to the lent machine). `--engine 1,64` adds, per variant, those
batch sizes through `lowbit.Engine.generate` (`lowbit-engine` rows: what a user of the engine
waits for a token; `+nooverlap` turns off the engine's `overlap_schedule`, which only those
rows use).

Variant names: `<scheme>[+eager][+nopdl][+cublas][+twolaunch][+unfusedq][+canonical]`;
`+canonical` keeps int4 weights in the canonical layout and its GEMV / MMA kernels instead of
the `mma16` layout's tensor-core kernel (LOWBIT_WNA16_MMA=0); `+nopdl` launches
without programmatic dependent launch (lowbit.kernels.triton.common.PDL_ENABLED off, as
LOWBIT_PDL=0 would), `+cublas` keeps unquantized linears on cuBLAS at M = 1
(dispatch.GEMV16_MAX_M = 0), `+twolaunch` sums split-K partials (and attention splits) in a
second launch instead of in the kernel (common.FUSED_SPLITK off, as LOWBIT_FUSED_SPLITK=0
would), `+unfusedq` quantizes W8A8 inputs in the GEMMs instead of in RMSNorm / SwiGLU
(LOWBIT_FUSE_ACT_QUANT=0), `+torchargmax` picks greedy tokens with torch's argmax instead of the
split Triton one (dispatch.SPLIT_ARGMAX off), `+notiled` keeps wide int4 weights at 33-64 rows on
the small-M kernel (dispatch.WNA16_MMA_TILED off), `+early8` loads the first weight tile of every
W8A8 / 16-bit GEMV before the PDL wait (w8a8_gemv.EARLY_DTYPES all; `+noearly8` none, the default
is fp8's), `+nodefer` quantizes a one-row SwiGLU in its own one-program pass instead of in the W8A8
GEMV (silu_mul.DEFER_DTYPES empty), `+deferfp8` defers fp8 too, `+unsliced` gives the `mma16`
kernel's 9-32-row programs four column units of one warp instead of K slices (wna16_mma.SLICED
empty), `+shortk` gives its one-row programs over down_proj's long K the short-K config
(wna16_mma.LONG_K off), `+bn8` keeps the W8A8 GEMV's 8-row blocks on weights of ≤ 4096 rows
(w8a8_gemm.GEMV_NARROW_N = 0), `+acc3d` runs the W8A8 / 16-bit GEMV's (M, BN, BK) accumulator
kernel instead of the per-row one (w8a8_gemv.ROW_ACC off), `+noattpf` reads decode attention's K /
V rows without first prefetching them to L2 before the PDL wait (paged_decode_attention.PREFETCH_KV
off), `+normsw` loads RMSNorm's weight after the wait (rms_norm.EARLY_WEIGHT off), `+late` /
`+early2` load none / two of the `mma16` GEMV's weight groups before the PDL wait at ≤ 32 rows
(wna16_mma.EARLY, default 1), `+early64one` one instead of two at 33-64 rows (EARLY_64). What-if
flags, timing only (wrong numbers): `+skiprms`, `+skipsilu`, `+skipactq` (the W8A8 GEMM's own
activation quantization), `+skiprope` (rotary + KV store), `+skipattn` (decode attention) run that
kernel once per shape and reuse its first result, so the step runs without it — the most fusing it
away could save. Scheme `bf16` (unquantized) or one of benchlib.BENCH_SCHEMES, lowbit's own
quantized plans over dummy weights (benchlib.bench_plan).
RMSNorm, rotary and SwiGLU run the fused Triton kernels in every variant (the layers call them
since run 4; runs 1–3 had a `+fused` flag that patched them in).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import tempfile
import time
from pathlib import Path

import torch
from benchlib import (
    bench_plan,
    environment,
    fast_dummy_weights,
    print_table,
    save,
    write_model_dir,
)

from lowbit.config import EngineArgs, ModelConfig
from lowbit.kernels import dispatch
from lowbit.quant.spec import QuantPlan

DEFAULT_VARIANTS = "bf16+eager,bf16,fp8,w4a16,w8a8_int8,nvfp4"


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _time_steps(runner, tok, lens: list[int], tables: list[list[int]], steps: int) -> float:
    """Seconds for `steps` greedy decode steps of len(lens) sequences, after 3 warm-up steps."""
    B = len(lens)
    for i in range(3 + steps):
        if i == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        lens = [L + 1 for L in lens]
        logits = runner.forward(tok, lens, [1] * B, tables, logits_at=list(range(B)))
        tok = dispatch.argmax(logits)  # as the engine's greedy sampler
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _skipped(fn):
    """fn that runs once per argument signature and then returns that first result without
    launching anything: a what-if variant's step without this kernel (wrong numbers, timing
    only: the most fusing it away could save)."""
    memo = {}

    def first_result(*args, **kwargs):
        key = tuple(
            (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else repr(a)
            for a in (*args, *kwargs.values())
        )
        if key not in memo:
            memo[key] = fn(*args, **kwargs)
        return memo[key]

    return first_result


@contextlib.contextmanager
def lowbit_decode_flags(variant: str):
    """Apply a variant's `+nopdl` / `+cublas` flags for the block: yields (scheme, flags)."""
    from lowbit.kernels.triton import (
        common,
        paged_decode_attention,
        rms_norm,
        silu_mul,
        w8a8_gemm,
        w8a8_gemv,
        wna16_mma,
    )

    overrides = {
        "nopdl": (common, "PDL_ENABLED", False),
        "cublas": (dispatch, "GEMV16_MAX_M", 0),
        "twolaunch": (common, "FUSED_SPLITK", False),
        "unfusedq": (dispatch, "FUSE_ACT_QUANT", False),
        "canonical": (dispatch, "WNA16_MMA", False),
        "late": (wna16_mma, "EARLY", 0),
        "early2": (wna16_mma, "EARLY", 2),
        "early64one": (wna16_mma, "EARLY_64", 1),
        "att64": (paged_decode_attention, "SHORT_CONTEXT", 64),
        "attbn128": (paged_decode_attention, "BLOCK_N", 128),
        "attbn32": (paged_decode_attention, "BLOCK_N", 32),
        "atts3": (paged_decode_attention, "NUM_STAGES", 3),
        "attw8": (paged_decode_attention, "NUM_WARPS", 8),
        "e2": (wna16_mma, "SMALL_N_E", 2),
        "torchargmax": (dispatch, "SPLIT_ARGMAX", False),
        "notiled": (dispatch, "WNA16_MMA_TILED", False),
        "early8": (
            w8a8_gemv,
            "EARLY_DTYPES",
            (torch.float8_e4m3fn, torch.int8, torch.bfloat16, torch.float16),
        ),
        "noearly8": (w8a8_gemv, "EARLY_DTYPES", ()),
        "nodefer": (silu_mul, "DEFER_DTYPES", ()),
        "deferfp8": (silu_mul, "DEFER_DTYPES", (torch.int8, torch.float8_e4m3fn)),
        "unsliced": (wna16_mma, "SLICED", {}),
        "shortk": (wna16_mma, "LONG_K", 1 << 30),
        "bn8": (w8a8_gemm, "GEMV_NARROW_N", 0),
        "acc3d": (w8a8_gemv, "ROW_ACC", False),
        "noattpf": (paged_decode_attention, "PREFETCH_KV", False),
        "normsw": (rms_norm, "EARLY_WEIGHT", False),
        "skiprms": (dispatch, "rms_norm", _skipped(dispatch.rms_norm)),
        "skipsilu": (dispatch, "silu_mul", _skipped(dispatch.silu_mul)),
        "skipactq": (w8a8_gemm, "act_quant", _skipped(w8a8_gemm.act_quant)),
        "skiprope": (dispatch, "rotary_kv_store", _skipped(dispatch.rotary_kv_store)),
        "skipattn": (
            dispatch,
            "paged_decode_attention",
            _skipped(dispatch.paged_decode_attention),
        ),  # fmt: skip
    }
    scheme, *flags = variant.split("+")
    if set(flags) - {"eager", "nooverlap", *overrides}:
        raise ValueError(f"variant {variant!r}: the flags are {['eager', 'nooverlap', *overrides]}")
    saved = {f: getattr(*overrides[f][:2]) for f in flags if f in overrides}
    try:
        for f in saved:
            setattr(*overrides[f])
        yield scheme, flags
    finally:
        for f, value in saved.items():
            setattr(*overrides[f][:2], value)


def lowbit_decode(model_dir: Path, variant: str, batches: list[int], prompt: int, steps: int):
    """tok/s per batch size for one lowbit variant."""
    with lowbit_decode_flags(variant) as (scheme, flags):
        return _lowbit_decode(model_dir, scheme, variant, flags, batches, prompt, steps)


def make_runner(model_dir: Path, scheme: str, flags, max_b: int, ctx: int):
    """(runner, setup seconds, blocks a sequence) of one lowbit variant, dummy weights."""
    from lowbit.engine.runner import ModelRunner

    cfg = ModelConfig.from_dir(model_dir)
    plan = QuantPlan() if scheme == "bf16" else bench_plan(scheme)
    blocks_per_seq = -(-ctx // 16)
    args = EngineArgs(
        model_path=str(model_dir), load_format="dummy", dtype="bfloat16", device="cuda",
        max_running_requests=max_b, max_total_tokens=max_b * blocks_per_seq * 16,
        disable_cuda_graph="eager" in flags,
    )  # fmt: skip
    with fast_dummy_weights():
        t0 = time.perf_counter()
        runner = ModelRunner(args, cfg, plan, model_dir)
    return runner, time.perf_counter() - t0, blocks_per_seq


def prefill(runner, B: int, prompt: int, blocks_per_seq: int):
    """Prefill B random prompts (≤ ~8k tokens a forward): (next tokens, block tables)."""
    vocab = runner.cfg.vocab_size
    tables = [list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)) for b in range(B)]
    ids = torch.randint(3, vocab, (B, prompt), device="cuda")
    chunk = max(1, 8192 // prompt)
    nxt = []
    for s in range(0, B, chunk):
        n = min(chunk, B - s)
        logits = runner.forward(
            ids[s : s + n].reshape(-1), [prompt] * n, [prompt] * n, tables[s : s + n],
            logits_at=[(i + 1) * prompt - 1 for i in range(n)],
        )  # fmt: skip
        nxt.append(logits.argmax(-1))
    return torch.cat(nxt), tables


def _lowbit_decode(model_dir, scheme, variant, flags, batches, prompt, steps):
    runner, setup_s, blocks_per_seq = make_runner(
        model_dir, scheme, flags, max(batches), prompt + steps + 8
    )
    out = []
    for B in batches:
        tok, tables = prefill(runner, B, prompt, blocks_per_seq)
        dt = _time_steps(runner, tok, [prompt] * B, tables, steps)
        out.append({
            "engine": "lowbit", "variant": variant, "batch": B, "tok_s": B * steps / dt,
            "ms_per_step": 1e3 * dt / steps, "setup_s": setup_s,
            "graphs": bool(runner.graphs),
        })  # fmt: skip
        print(out[-1], flush=True)
    del runner
    _free()
    return out


def make_engine(model_dir: Path, scheme: str, flags: list[str], batch: int, tokens: int):
    """A `lowbit.Engine` of the variant over the dummy weights (lowbit's own plan for a quantized
    scheme, as the runner loop), for `batch` sequences of up to `tokens` tokens."""
    import lowbit
    import lowbit.engine.engine as engine_mod

    saved = engine_mod.resolve_plan
    if scheme != "bf16":
        engine_mod.resolve_plan = lambda *a, **k: bench_plan(scheme)
    try:
        with fast_dummy_weights():
            return lowbit.Engine(
                str(model_dir), load_format="dummy", dtype="bfloat16", device="cuda",
                max_running_requests=batch, max_total_tokens=batch * tokens,
                disable_cuda_graph="eager" in flags, overlap_schedule="nooverlap" not in flags,
            )  # fmt: skip
    finally:
        engine_mod.resolve_plan = saved


def engine_decode(model_dir: Path, variant: str, prompt: int, steps: int, batch: int) -> dict:
    """Decode of `batch` prompts through `lowbit.Engine.generate`: the runner loop above plus
    what a user of the engine also waits for each step — scheduler, sampler (its device-to-host
    sync), detokenizer and stop checks. tok/s = batch · steps / (time of 1 + steps new tokens
    − time of 1 new token)."""
    with lowbit_decode_flags(variant) as (scheme, flags):
        eng = make_engine(model_dir, scheme, flags, batch, prompt + steps + 64)
        ids = torch.randint(3, eng.model_config.vocab_size, (batch, prompt)).tolist()
        params = {"temperature": 0, "ignore_eos": True}
        eng.generate(ids, {**params, "max_new_tokens": 8})  # warm-up
        times = []
        for n in (1, 1 + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = eng.generate(ids, {**params, "max_new_tokens": n})
            times.append(time.perf_counter() - t0)
            assert all(len(o.outputs[0].token_ids) == n for o in out)
        eng.shutdown()
    del eng
    _free()
    dt = times[1] - times[0]
    row = {"engine": "lowbit-engine", "variant": variant, "batch": batch,
           "tok_s": batch * steps / dt,
           "ms_per_step": 1e3 * dt / steps}  # fmt: skip
    print(row, flush=True)
    return row


def _hf_model():
    """HF transformers Llama of the benchmark shape on the GPU: random bf16 weights, sdpa."""
    import transformers
    from benchlib import LLAMA3_8B

    kw = {k: v for k, v in LLAMA3_8B.items() if k not in ("architectures", "model_type", "dtype")}
    cfg = transformers.LlamaConfig(**kw)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def _greedy(model, tok, **kw):
    """One HF decode step: next token ids (B, 1)."""
    return model(tok, use_cache=True, **kw).logits[:, -1].argmax(-1, keepdim=True)


def hf_decode(batches: list[int], prompt: int, steps: int):
    """HF transformers eager baseline: same shape, random bf16 weights, DynamicCache."""
    import transformers

    model = _hf_model()
    out = []
    with torch.inference_mode():
        for B in batches:
            ids = torch.randint(3, model.config.vocab_size, (B, prompt), device="cuda")
            cache = transformers.DynamicCache()
            res = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = res.logits[:, -1].argmax(-1, keepdim=True)
            n = max(4, steps // 8)
            for i in range(2 + n):
                if i == 2:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                tok = _greedy(model, tok, past_key_values=cache)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            out.append({"engine": "hf-eager", "variant": "bf16", "batch": B,
                        "tok_s": B * n / dt, "ms_per_step": 1e3 * dt / n})  # fmt: skip
            print(out[-1], flush=True)
            del cache, res
            _free()
    del model
    _free()
    return out


def torchao_decode(batches: list[int], prompt: int, steps: int):
    """torchao baseline as its docs run it: HF model, `Int4WeightOnlyConfig(group_size=128)`
    (tinygemm's tile-packed layout), static KV cache, the decode step under
    `torch.compile(mode="reduce-overhead")` (CUDA graphs), gpt-fast style."""
    import transformers
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    model = _hf_model()
    quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
    step = torch.compile(_greedy, mode="reduce-overhead", fullgraph=True)
    out = []
    with torch.inference_mode():
        for B in batches:
            ids = torch.randint(3, model.config.vocab_size, (B, prompt), device="cuda")
            cache = transformers.StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
            pos = torch.arange(prompt, device="cuda")
            tok = _greedy(model, ids, past_key_values=cache, cache_position=pos)
            t_compile = time.perf_counter()
            for i in range(3 + steps):  # the first calls compile and record the graph
                if i == 3:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                pos = torch.tensor([prompt + i], device="cuda")
                tok = step(model, tok.clone(), past_key_values=cache, cache_position=pos)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            out.append({"engine": "torchao", "variant": "int4wo-128+compile", "batch": B,
                        "tok_s": B * steps / dt, "ms_per_step": 1e3 * dt / steps,
                        "setup_s": t0 - t_compile})  # fmt: skip
            print(out[-1], flush=True)
            del cache
            _free()
    del model
    _free()
    return out


def main() -> None:
    """Run the variants and the baselines; print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--torchao-batches",
        default="1",
        help="batch sizes of the torchao int4wo-128+compile baseline ('' skips it)",
    )
    ap.add_argument(
        "--engine",
        default="",
        help="batch sizes (e.g. 1,64) to also time through lowbit.Engine.generate (scheduler, "
        "sampler, detokenizer and the per-step sync included); '' skips it",
    )
    ap.add_argument("--out", type=Path, default=None, help="also copy the JSON here")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows, env = [], environment()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "llama3-8b-shape")
        if not args.skip_hf:  # the baseline first, so a timeout cannot lose it
            try:
                rows += hf_decode(batches, args.prompt, args.steps)
            except Exception as e:
                print(f"ERROR hf-eager: {type(e).__name__}: {e}", flush=True)
                rows.append({"engine": "hf-eager", "variant": "bf16", "error": str(e)[:300]})
                _free()
        for variant in args.variants.split(","):
            bs = [1] if "eager" in variant else batches
            try:
                rows += lowbit_decode(model_dir, variant, bs, args.prompt, args.steps)
            except Exception as e:  # report and go on: one broken scheme must not hide the rest
                print(f"ERROR {variant}: {type(e).__name__}: {e}", flush=True)
                rows.append({"engine": "lowbit", "variant": variant, "error": str(e)[:300]})
                _free()
            for b in [int(b) for b in args.engine.split(",") if b]:
                try:
                    rows.append(engine_decode(model_dir, variant, args.prompt, args.steps, b))
                except Exception as e:
                    print(f"ERROR engine {variant} batch {b}: {type(e).__name__}: {e}", flush=True)
                    rows.append({"engine": "lowbit-engine", "variant": variant, "batch": b,
                                 "error": str(e)[:300]})  # fmt: skip
                    _free()
            save("decode", {"env": env, "rows": rows}, args.out)  # partial results survive
    tao_batches = [int(b) for b in args.torchao_batches.split(",") if b]
    try:
        import torchao  # noqa: F401
    except ImportError:
        tao_batches = []
        rows.append({"engine": "torchao", "variant": "int4wo-128+compile",
                     "error": "torchao is not installed here; baseline skipped"})  # fmt: skip
    if tao_batches:
        try:
            rows += torchao_decode(tao_batches, args.prompt, args.steps)
        except Exception as e:
            print(f"ERROR torchao: {type(e).__name__}: {e}", flush=True)
            rows.append({"engine": "torchao", "variant": "int4wo-128+compile",
                         "error": str(e)[:300]})  # fmt: skip
            _free()
    hf = {r["batch"]: r["tok_s"] for r in rows if r.get("engine") == "hf-eager"}
    for r in rows:
        if "tok_s" in r and r.get("batch") in hf:
            r["x_hf_eager"] = r["tok_s"] / hf[r["batch"]]
    print_table(
        [r for r in rows if "tok_s" in r],
        ["engine", "variant", "batch", "tok_s", "ms_per_step", "x_hf_eager"],
    )
    path = save("decode", {"env": env, "prompt": args.prompt, "steps": args.steps,
                           "rows": rows}, args.out)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
