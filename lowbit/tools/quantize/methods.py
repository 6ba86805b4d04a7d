"""The `--method` table: numerics, algorithm, activation scheme, formats and quality gate of each.

Quality gate (built-in held-out text, against the original model): the export fails when any
logit is not finite, the mean KL divergence (nats/token) exceeds `max_kl`, or perplexity grows by
more than the factor `max_ppl_ratio`. These catch broken quantization (wrong scales, overflow,
a diverged calibration), not a small loss: typical values are 5-10x lower (W4A16 on an 8B Llama:
KL ≈ 0.02-0.05; FP8 ≈ 0.005). Top-1 agreement is reported but gated only with `--min-top1`,
since it is meaningless on the flat distributions of small untrained models. Override the
thresholds with `--max-kl` / `--max-ppl-ratio` / `--min-top1`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One `--method`: how weights (and activations) are quantized and where they may be written."""

    name: str
    weight: str  # "int" | "fp8" | "nvfp4"
    bits: int = 4
    sym: bool = True
    group_size: int = 128  # -1: one group per row (per channel)
    fp8_strategy: str = "channel"  # tensor | channel | block
    algorithm: str = "rtn"  # rtn | gptq | awq | smoothquant
    act: str | None = None  # fake_quant_activation name, None for weight-only
    formats: tuple[str, ...] = ("compressed-tensors",)
    max_kl: float = 0.1
    max_ppl_ratio: float = 1.1

    @property
    def needs_calibration(self) -> bool:
        """Whether the method runs calibration data through the model."""
        return self.algorithm != "rtn" or self.act in ("fp8-static", "nvfp4")

    @property
    def default_format(self) -> str:
        """The first (default) output format."""
        return self.formats[0]


_INT4 = ("compressed-tensors", "awq", "gptq")
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("w4a16-rtn", "int", formats=_INT4, max_kl=0.25, max_ppl_ratio=1.3),
        Method("w4a16-gptq", "int", algorithm="gptq", formats=_INT4, max_kl=0.2,
               max_ppl_ratio=1.25),
        Method("w4a16-awq", "int", sym=False, algorithm="awq", formats=_INT4, max_kl=0.2,
               max_ppl_ratio=1.25),
        Method("w8a16", "int", bits=8, group_size=-1, max_kl=0.01, max_ppl_ratio=1.02),
        Method("fp8-dynamic", "fp8", fp8_strategy="channel", act="fp8-token", max_kl=0.05,
               max_ppl_ratio=1.05),
        Method("fp8-static", "fp8", fp8_strategy="tensor", act="fp8-static", max_kl=0.05,
               max_ppl_ratio=1.05),
        Method("fp8-block", "fp8", fp8_strategy="block", act="fp8-group128", max_kl=0.05,
               max_ppl_ratio=1.05),
        Method("w8a8-int8", "int", bits=8, group_size=-1, algorithm="smoothquant",
               act="int8-token", max_kl=0.05, max_ppl_ratio=1.05),
        Method("nvfp4", "nvfp4", group_size=16, act="nvfp4", max_kl=0.5, max_ppl_ratio=1.4),
        Method("nvfp4a16", "nvfp4", group_size=16, max_kl=0.3, max_ppl_ratio=1.3),
        Method("modelopt_fp8", "fp8", fp8_strategy="tensor", act="fp8-static",
               formats=("modelopt",), max_kl=0.05, max_ppl_ratio=1.05),
        Method("modelopt_fp4", "nvfp4", group_size=16, act="nvfp4", formats=("modelopt",),
               max_kl=0.5, max_ppl_ratio=1.4),
    )
}  # fmt: skip


def get_method(name: str) -> Method:
    """Look a method up by name; the error lists them all."""
    if name not in METHODS:
        raise ValueError(f"unknown --method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
