"""Shared benchmark pieces: the Llama-3-8B shape, environment facts, tables and JSON, and the
bench-only stand-ins used until the real quantized schemes and fused layers are wired in.

Stand-ins (clearly labelled in every table that uses them):
  * `StandInPlan` gives each decoder linear a minimal scheme over `lowbit.kernels.dispatch`
    (W4A16 g128, FP8 row-wise, FP8 128×128 block, INT8 W8A8); lm_head stays bf16. It measures
    the kernels end to end before `lowbit/quant/schemes/*` call dispatch themselves.
  * `fused_layers()` swaps RMSNorm / rotary / SwiGLU for the fused Triton kernels
    (`dispatch.rms_norm`, `dispatch.rotary`, `dispatch.silu_mul`) for the duration of a run:
    what layers/norm.py, layers/rotary.py and models/llama.py get once they call dispatch.
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
from torch import Tensor

from lowbit.kernels import dispatch

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


# ---- stand-in schemes over kernels.dispatch ----


class _StandIn:
    """Shared scheme plumbing: no loading (dummy weights only), `describe` for printing."""

    name = "stand-in"

    def process_weights_after_loading(self, layer) -> None:
        """Dummy weights are drawn in the kernel layout already."""

    def describe(self) -> str:
        """Scheme and kernel."""
        return f"bench stand-in {self.name}"


class W4A16StandIn(_StandIn):
    """int4 g128 asymmetric, canonical packed layout → Triton wna16_gemm."""

    name = "w4a16"

    def create_weights(self, layer) -> None:
        """qweight (K, N/8) int32, scales (K/128, N), qzeros (K/128, N/8)."""
        K, N = layer.input_size, layer.output_size
        layer.add_param("qweight", torch.empty(K, N // 8, dtype=torch.int32))
        layer.add_param("scales", torch.empty(K // 128, N, dtype=layer.params_dtype))
        layer.add_param("qzeros", torch.empty(K // 128, N // 8, dtype=torch.int32))

    def apply(self, layer, x: Tensor, bias: Tensor | None) -> Tensor:
        """Weight-only GEMM."""
        return dispatch.wna16_gemm(x, layer.qweight, layer.scales, layer.qzeros, 128, 4, bias)


class FP8RowStandIn(_StandIn):
    """FP8 per-channel weight, dynamic per-token activations → torch._scaled_mm."""

    name = "fp8"

    def create_weights(self, layer) -> None:
        """weight (N, K) e4m3, weight_scale (N,) float32."""
        N, K = layer.output_size, layer.input_size
        layer.add_param("weight", torch.empty(N, K, dtype=torch.float8_e4m3fn))
        layer.add_param("weight_scale", torch.empty(N, dtype=torch.float32))

    def apply(self, layer, x: Tensor, bias: Tensor | None) -> Tensor:
        """Row-wise scaled FP8 GEMM."""
        return dispatch.fp8_scaled_mm(x, layer.weight, layer.weight_scale, None, bias)


class FP8BlockStandIn(FP8RowStandIn):
    """FP8 128×128 block weight scales, 1×128 activation groups → Triton fp8_block_gemm."""

    name = "fp8-block"

    def create_weights(self, layer) -> None:
        """weight (N, K) e4m3, weight_scale (N/128, K/128) float32."""
        N, K = layer.output_size, layer.input_size
        layer.add_param("weight", torch.empty(N, K, dtype=torch.float8_e4m3fn))
        layer.add_param("weight_scale", torch.empty(-(-N // 128), K // 128, dtype=torch.float32))

    def apply(self, layer, x: Tensor, bias: Tensor | None) -> Tensor:
        """Block-scaled FP8 GEMM."""
        return dispatch.fp8_block_gemm(x, layer.weight, layer.weight_scale, (128, 128), bias)


class Int8StandIn(_StandIn):
    """INT8 per-channel weight, dynamic per-token activations → Triton int8_gemm."""

    name = "w8a8-int8"

    def create_weights(self, layer) -> None:
        """weight (N, K) int8, weight_scale (N,) float32."""
        N, K = layer.output_size, layer.input_size
        layer.add_param("weight", torch.empty(N, K, dtype=torch.int8))
        layer.add_param("weight_scale", torch.empty(N, dtype=torch.float32))

    def apply(self, layer, x: Tensor, bias: Tensor | None) -> Tensor:
        """INT8 GEMM with the dequant in the epilogue."""
        return dispatch.int8_gemm(x, layer.weight, layer.weight_scale, None, bias)


STAND_INS = {c.name: c for c in (W4A16StandIn, FP8RowStandIn, FP8BlockStandIn, Int8StandIn)}


def stand_in_plan(name: str):
    """A QuantPlan giving every decoder linear the stand-in `name`; lm_head stays bf16."""
    from lowbit.quant.schemes.unquantized import UnquantizedScheme
    from lowbit.quant.spec import QuantPlan

    cls = STAND_INS[name]

    class StandInPlan(QuantPlan):
        def scheme_for(self, prefix, sources):
            return UnquantizedScheme() if prefix == "lm_head" else cls()

    return StandInPlan(method=f"stand-in:{name}", description=cls.name)


# ---- fast dummy weights and fused layers ----


@torch.no_grad()
def _gpu_dummy_weights(model, plan, seed: int = 0) -> None:
    """Dummy weights drawn on the device: small normals, unit norms, random codes, small scales."""
    from lowbit.layers.linear import LinearBase

    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
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


@contextlib.contextmanager
def fused_layers(enabled: bool = True):
    """Route RMSNorm, rotary and SwiGLU through the fused Triton kernels for this block."""
    if not enabled:
        yield
        return
    from lowbit.layers.norm import RMSNorm
    from lowbit.layers.rotary import RotaryEmbedding
    from lowbit.models.llama import DecoderMLP

    saved = (RMSNorm.forward, RotaryEmbedding.forward, DecoderMLP.forward)
    RMSNorm.forward = lambda self, x, residual=None: dispatch.rms_norm(
        x, self.weight, self.eps, residual
    )
    RotaryEmbedding.forward = lambda self, positions, q, k: dispatch.rotary(
        positions, q, k, self.cos, self.sin
    )
    DecoderMLP.forward = lambda self, x: self.down_proj(dispatch.silu_mul(self.gate_up_proj(x)))
    try:
        yield
    finally:
        RMSNorm.forward, RotaryEmbedding.forward, DecoderMLP.forward = saved
