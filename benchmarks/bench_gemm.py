"""Each GEMM scheme vs bf16 cuBLAS on the Llama-3-8B linear shapes.

    python benchmarks/bench_gemm.py [--ms 1,16,64,256,1024,4096] [--out DIR]

Per (shape, M, scheme): median time of one GEMM, from replays of a CUDA graph that runs it once
per weight copy (copies together larger than L2, so nothing is served from cache; the graph
removes Python and launch overhead, as in decode), TFLOP/s, GB/s of the minimum
bytes (weights + scales + activations in + out), % of the roofline (the larger of the compute
and memory floors at the measured ceilings), and speedup over bf16. Dynamic activation
quantization is inside the timed region for every W8A8 scheme (fp8-tensor: static scale) except
fp8-prequant, which is fp8-row's GEMM on activations already quantized per token, as lowbit's
RMSNorm and SwiGLU hand them to qkv, gate_up and down (o_proj's input is quantized by a launch
of its own, so fp8-row is its number).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from benchlib import (
    PEAK_8BIT,
    PEAK_BF16,
    PEAK_BW,
    ROTATE_BYTES,
    environment,
    graph_us,
    print_table,
    save,
)

from lowbit.kernels import dispatch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
EXTRA_SHAPES = {"lm_head": (128256, 4096)}  # only when named in --shapes


def _weights(scheme: str, N: int, K: int) -> tuple[dict, int]:
    """One set of random weights in the scheme's layout, and its bytes."""
    d = "cuda"
    if scheme.split(":")[0] in ("bf16", "bf16-triton"):
        w = {"w": torch.randn(N, K, device=d, dtype=torch.bfloat16) * 0.02}
    elif scheme.split(":")[0] in ("w4a16", "w8a16", "w4a16-mma", "w8a16-mma"):
        bits = 4 if scheme.startswith("w4a16") else 8
        P = 32 // bits
        w = {
            "qweight": torch.randint(-(2**31), 2**31 - 1, (K, N // P), device=d, dtype=torch.int32),
            "scales": torch.rand(K // 128, N, device=d, dtype=torch.bfloat16) * 1e-3,
            "qzeros": torch.randint(-(2**31), 2**31 - 1, (K // 128, N // P), device=d,
                                    dtype=torch.int32),
        }  # fmt: skip
        # int4 in the mma16 layout where lowbit loads it so (the default "w4a16" as served, and
        # the "w4a16:mma16" / "w4a16:mma16tiled" probes); "w4a16:canonical" keeps the canonical
        # layout's kernels
        probe = scheme.partition(":")[2].split(",")[0]
        mma16 = probe in ("mma16", "mma16tiled") or (
            scheme == "w4a16" and dispatch.wna16_mma_layout(torch.device(d), N, K, 128, 4)
        )
        if bits == 4 and mma16:
            from lowbit.kernels.mma16 import pack_mma16

            w["qweight"] = pack_mma16(w["qweight"])
    elif scheme.split(":")[0] in ("fp8-row", "fp8-prequant", "fp8-cublas", "fp8-triton",
                                  "fp8-tensor"):  # fmt: skip
        per_row = scheme != "fp8-tensor"
        w = {
            "w": torch.randn(N, K, device=d).clamp(-8, 8).to(torch.float8_e4m3fn),
            "s": torch.rand(N if per_row else 1, device=d) * 1e-3,
        }
    elif scheme == "fp8-block":
        w = {
            "w": torch.randn(N, K, device=d).clamp(-8, 8).to(torch.float8_e4m3fn),
            "s": torch.rand(N // 128, K // 128, device=d) * 1e-3,
        }
    elif scheme.split(":")[0] == "nvfp4":  # weight-only: e2m1 codes, e4m3 scales a 16-group
        w = {
            "w": torch.randint(0, 256, (N, K // 2), device=d, dtype=torch.uint8),
            "bs": (torch.rand(N, K // 16, device=d) * 2 + 0.01).to(torch.float8_e4m3fn),
            "rs": torch.rand(N, device=d) * 1e-3,
        }
    elif scheme.split(":")[0] == "int8":
        w = {
            "w": torch.randint(-127, 128, (N, K), device=d, dtype=torch.int8),
            "s": torch.rand(N, device=d) * 1e-3,
        }
    else:
        raise KeyError(scheme)
    return w, sum(t.numel() * t.element_size() for t in w.values())


def _call(scheme: str, x, w):
    """Run one GEMM. Probes: "w4a16:warps=8,stages=2" (tensor-core kernel launch config),
    "w4a16:gemv,block_w=32,block_k=64,chunk=128,warps=1,waves=8,stages=2,unroll=1" (GEMV
    config), "w4a16:tiled,bm=128,bn=128,bk=64,warps=8,stages=3,group_m=8,swap=1" (the tiled
    GEMM, `wna16_gemm_tiled`; omitted keys keep its defaults), "w4a16:mma16,e=4,waves=16,
    max_split=16" (the small-M tensor-core kernel on its `mma16` layout; plain "w4a16" is what
    dispatch serves, in that layout where lowbit loads int4 so), "w4a16:mma16tiled,bm=128,
    bn=64,bk=128,warps=4,stages=4,group_m=8,split=0" (the tiled GEMM on the `mma16` layout,
    `wna16_mma_tiled`; omitted keys keep its defaults), "w4a16:canonical" (the
    canonical layout's kernels), "w4a16-mma" (the tensor-core
    kernel at any M), "fp8-triton" (the split-K Triton W8A8 kernel); "fp8-triton:gemv,bn=16,
    bk=256,warps=4,waves=4" / "int8:mma,split=8" (W8A8 through one path with its config);
    "bf16-triton[:bn=16,bk=256,warps=4,stages=3,waves=8]" (the 16-bit GEMV, `gemv16`, M ≤ 2);
    "nvfp4" (the weight-only FP4 kernel, `fp4_gemm`, on its default path), "nvfp4:gemv,bn=16,
    bk=256,warps=4,stages=1,waves=4,split=0" / "nvfp4:mma,bm=128,bn=128,bk=64,warps=8,stages=3,
    group_m=8,swap=1" (one path with its config)."""
    base, path, over = _probe(scheme)
    if base == "bf16-triton":  # the 16-bit Triton GEMV, "bf16-triton:bn=16,bk=256,stages=3,…"
        from lowbit.kernels.triton.w8a8_gemv import gemv16

        return gemv16(x, w["w"], config=over)
    if base == "nvfp4":
        from lowbit.kernels.triton.fp4_gemm import fp4_gemm

        config = {"path": path, **over} if path else None
        return fp4_gemm(x, w["w"], w["bs"], w["rs"], 16, config=config)
    if path is not None and base in ("fp8-triton", "int8"):
        from lowbit.kernels.triton.w8a8_gemm import w8a8_gemm

        return w8a8_gemm(x, w["w"], w["s"], config={"path": path, **over})
    if path is not None:
        return _with_wna16_config(base, path, over, x, w)
    if scheme == "bf16":
        return F.linear(x, w["w"])
    if scheme in ("w4a16", "w8a16"):  # either layout (see _weights)
        bits = 4 if scheme == "w4a16" else 8
        return dispatch.wna16_gemm(x, w["qweight"], w["scales"], w["qzeros"], 128, bits)
    if scheme in ("w4a16-mma", "w8a16-mma"):
        from lowbit.kernels.triton.wna16_gemm import wna16_gemm

        bits = 4 if scheme == "w4a16-mma" else 8
        return wna16_gemm(x, w["qweight"], w["scales"], w["qzeros"], 128, bits)
    if scheme in ("fp8-row", "fp8-prequant"):  # per-channel weight, dynamic per-token x
        return dispatch.fp8_scaled_mm(x, w["w"], w["s"])
    if scheme == "fp8-cublas":  # the same, always through torch._scaled_mm
        return dispatch._fp8_cublas(x, w["w"], w["s"])
    if scheme == "fp8-triton":  # the same, always through the split-K Triton kernel
        from lowbit.kernels.triton.w8a8_gemm import w8a8_gemm

        return w8a8_gemm(x, w["w"], w["s"])
    if scheme == "fp8-tensor":  # per-tensor weight, static per-tensor activation scale
        return dispatch.fp8_scaled_mm(x, w["w"], w["s"], w["s"])
    if scheme == "fp8-block":
        return dispatch.fp8_block_gemm(x, w["w"], w["s"])
    return dispatch.int8_gemm(x, w["w"], w["s"])


def _probe(scheme: str) -> tuple[str, str | None, dict[str, int]]:
    """ "base:path,k=v,…" → (base, path, {k: v}); a plain scheme → (scheme, None, {}).
    "w4a16:warps=8,…" (no path) names the tensor-core kernel's config ("mma")."""
    base, colon, spec = scheme.partition(":")
    if not colon:
        return base, None, {}
    path, _, rest = spec.partition(",")
    if "=" in path:
        path, rest = "mma", spec
    return base, path, {k: int(v) for k, v in (kv.split("=") for kv in rest.split(",") if kv)}


def _with_wna16_config(base: str, path: str, over: dict, x, w):
    """W4A16 / W8A16 through one kernel with its config overridden (a tuning probe, not a
    dispatch path): the GEMV, the tiled kernels, or the tensor-core kernels ("mma", "mma16")."""
    import lowbit.kernels.triton.wna16_gemm as mod

    bits = 4 if base == "w4a16" else 8
    if path == "canonical":  # dispatch over the canonical layout (LOWBIT_WNA16_MMA=0)
        return dispatch.wna16_gemm(x, w["qweight"], w["scales"], w["qzeros"], 128, bits)
    if path == "mma16":  # the small-M tensor-core kernel on the pre-shuffled layout
        from lowbit.kernels.triton.wna16_mma import wna16_mma_gemm

        return wna16_mma_gemm(x, w["qweight"], w["scales"], w["qzeros"], 128, config=over)
    if path == "mma16tiled":  # the tiled GEMM on the same layout
        from lowbit.kernels.triton.wna16_mma_tiled import wna16_mma_tiled

        return wna16_mma_tiled(x, w["qweight"], w["scales"], w["qzeros"], 128, config=over)
    if path in ("gemv", "tiled"):
        if path == "gemv":
            from lowbit.kernels.triton.wna16_gemv import wna16_gemv as fn
        else:
            from lowbit.kernels.triton.wna16_tiled import wna16_gemm_tiled as fn
        return fn(x, w["qweight"], w["scales"], w["qzeros"], 128, bits, config=over)
    saved = mod._config

    def config(M, N, K, G):
        bm, bn, bk, split, warps, stages = saved(M, N, K, G)
        return (
            bm,
            over.get("bn", bn),
            over.get("bk", bk),
            over.get("split", split),
            over.get("warps", warps),
            over.get("stages", stages),
        )

    mod._config = config
    try:
        return mod.wna16_gemm(x, w["qweight"], w["scales"], w["qzeros"], 128, bits)
    finally:
        mod._config = saved


def bench(scheme: str, name: str, N: int, K: int, M: int) -> dict:
    """Median time of one (scheme, shape, M) and its derived rates."""
    one, wbytes = _weights(scheme, N, K)
    copies = [one] + [_weights(scheme, N, K)[0] for _ in range(max(0, ROTATE_BYTES // wbytes))]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    if scheme == "fp8-prequant":  # quantized by its producer, as RMSNorm / SwiGLU do in lowbit
        xq, xs = dispatch.act_quant(x, torch.float8_e4m3fn)
        x = dispatch.QuantizedActivation(xq, xs, torch.bfloat16)
    y = _call(scheme, x, one)
    assert y.shape == (M, N) and not torch.isnan(y).any(), (scheme, name, M)
    ms = graph_us(lambda w: _call(scheme, x, w), copies) / 1e3
    flops = 2 * M * N * K
    nbytes = wbytes + 2 * M * (K + N)
    peak = (
        PEAK_BF16
        if scheme.split(":")[0].split("-")[0] in ("bf16", "w4a16", "w8a16", "nvfp4")
        else PEAK_8BIT
    )
    floor_s = max(flops / peak, nbytes / PEAK_BW)
    return {
        "shape": name, "N": N, "K": K, "M": M, "scheme": scheme, "us": ms * 1e3,
        "tflops": flops / ms / 1e9, "gbps": nbytes / ms / 1e6,
        "roofline_pct": 100 * floor_s / (ms * 1e-3),
    }  # fmt: skip


def main() -> None:
    """Run every scheme on every shape and M; print the table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1,16,64,256,1024,4096")
    ap.add_argument(
        "--schemes",
        default="bf16,w4a16,w8a16,fp8-row,fp8-cublas,fp8-triton,fp8-tensor,fp8-block,int8",
        help="comma-separated; use ';' instead when a probe has commas",
    )
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"of {[*SHAPES, *EXTRA_SHAPES]}")
    ap.add_argument("--out", type=Path, default=None, help="also copy the JSON here")
    args = ap.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    schemes = args.schemes.split(";" if ";" in args.schemes else ",")
    rows, env = [], environment()
    for name in args.shapes.split(","):
        N, K = {**SHAPES, **EXTRA_SHAPES}[name]
        for M in ms:
            base = None
            for scheme in schemes:
                try:
                    r = bench(scheme, name, N, K, M)
                except Exception as e:  # one broken scheme must not hide the others' numbers
                    r = {"shape": name, "N": N, "K": K, "M": M, "scheme": scheme,
                         "error": f"{type(e).__name__}: {e}"[:300]}  # fmt: skip
                    print("ERROR", r, flush=True)
                    rows.append(r)
                    continue
                base = r["us"] if scheme == "bf16" else base
                r["speedup_vs_bf16"] = base / r["us"] if base else None
                rows.append(r)
                torch.cuda.empty_cache()
        save("gemm", {"env": env, "rows": rows}, args.out)  # partial results survive a timeout
    print_table(
        [r for r in rows if "error" not in r],
        ["shape", "M", "scheme", "us", "tflops", "gbps", "roofline_pct", "speedup_vs_bf16"],
    )
    path = save("gemm", {"env": env, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
