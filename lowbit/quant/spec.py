"""QuantSpec (one module's numbers) and QuantPlan (the spec and scheme of every module)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from lowbit.quant.scheme import QuantScheme, scheme_class


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole weight (one per shard of a fused layer)."""

    def __str__(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel."""

    def __str__(self) -> str:
        return "channel"


@dataclass(frozen=True)
class PerGroup:
    """One scale per `size` consecutive inputs of each output channel."""

    size: int

    def __str__(self) -> str:
        return f"group{self.size}"


@dataclass(frozen=True)
class PerBlock:
    """One scale per (n × k) tile of the (out, in) weight."""

    n: int
    k: int

    def __str__(self) -> str:
        return f"block{self.n}x{self.k}"


Granularity = PerTensor | PerChannel | PerGroup | PerBlock
ACT_MODES = ("dynamic_token", "dynamic_tensor", "static_tensor", "dynamic_group")
WEIGHT_DTYPES = ("int2", "int3", "int4", "int8", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4", "fp4")


@dataclass(frozen=True)
class ActQuant:
    """How activations are quantized before the GEMM."""

    dtype: str  # "fp8_e4m3" | "int8" | "fp4_e2m1"
    mode: str  # one of ACT_MODES
    group_size: int | None = None
    qmax: float | None = None  # absmax divisor when the format's differs from the dtype's max
    threshold: float | None = None  # LLM.int8: |x| at or above it keeps its column in float16
    scale_dtype: str | None = None  # "e8m0": power-of-two group scales (MX), else float32

    def __str__(self) -> str:
        group = f"{self.group_size}" if self.group_size else ""
        scale = f" {self.scale_dtype}" if self.scale_dtype else ""
        return f"{self.dtype} {self.mode}{group}{scale}"


@dataclass(frozen=True)
class QuantSpec:
    """The numbers of one quantized linear module, independent of who wrote the checkpoint.

    `layout` names the on-disk tensor layout the scheme reads before repacking ("gptq", "awq",
    "ct_pack", "fp8", "ct_nvfp4", "modelopt_nvfp4", "bnb4", …); it is the format's only trace.
    """

    weight: str
    granularity: Granularity
    layout: str
    symmetric: bool = True
    scale_dtype: str = "model"
    global_scale: bool = False
    act: ActQuant | None = None
    act_order: bool = False
    pre_quant_scale: bool = False  # AWQ smoothing vector multiplied into the input (ModelOpt)

    def __post_init__(self):
        if self.weight not in WEIGHT_DTYPES:
            raise ValueError(f"weight dtype {self.weight!r} unknown; known: {WEIGHT_DTYPES}")
        if self.act is not None and self.act.mode not in ACT_MODES:
            raise ValueError(f"activation mode {self.act.mode!r} unknown; known: {ACT_MODES}")

    @property
    def bits(self) -> int:
        """Bits per weight code."""
        return {"int2": 2, "int3": 3, "int4": 4, "int8": 8, "fp4_e2m1": 4, "nf4": 4, "fp4": 4}.get(
            self.weight, 8
        )

    @property
    def group_size(self) -> int | None:
        """Group size along the input for group-wise specs, else None."""
        return self.granularity.size if isinstance(self.granularity, PerGroup) else None

    @property
    def scheme(self) -> str:
        """Name of the runtime scheme that computes this spec."""
        if self.layout in ("bnb4", "bnb8"):
            return "bnb"
        if self.weight.startswith("int") and self.act is None:
            return "wna16"
        if self.weight == "int8" and self.act is not None and self.act.dtype == "int8":
            return "w8a8_int8"
        if self.weight.startswith("fp8") and self.scale_dtype == "e8m0" and self.group_size:
            return "mxfp8"
        if self.weight.startswith("fp8"):
            return "w8a8_fp8"
        if self.weight == "fp4_e2m1":
            return "fp4"
        raise ValueError(f"no runtime scheme computes {self}; supported: {SUPPORTED}")

    def __str__(self) -> str:
        sym = "sym" if self.symmetric else "asym"
        act = f" act={self.act}" if self.act else " weight-only"
        order = " act-order" if self.act_order else ""
        scale = f" scale={self.scale_dtype}" if self.scale_dtype == "e8m0" else ""
        return f"{self.weight} {self.granularity}{scale} {sym}{act}{order} [{self.layout}]"


SUPPORTED = (
    "int2/3/4/8 weight-only, fp8 W8A8/W8A16, int8 W8A8, mxfp8, nvfp4/mxfp4, "
    "bitsandbytes nf4/fp4/int8"
)


def make_scheme(spec: QuantSpec | None) -> QuantScheme:
    """The runtime scheme object for one module's spec (None → unquantized)."""
    if spec is None:
        return scheme_class("unquantized")()
    return scheme_class(spec.scheme)(spec)


@dataclass
class QuantPlan:
    """Per-module specs and the checkpoint-tensor rewriting a format needs.

    `spec_of(source)` answers for a checkpoint module name; fused layers whose shards disagree get
    a per-shard scheme, and their tensors are renamed `<module>.<param>` → `<module>.s<i>_<param>`
    (see `transform`). `kv_scales[layer] = {"k": float, "v": float}` fills while tensors stream.
    """

    method: str | None = None
    description: str = "unquantized"
    spec_of: Callable[[str], QuantSpec | None] = lambda name: None
    rename: Callable[[str, Tensor], list[tuple[str, Tensor]]] = lambda n, t: [(n, t)]
    unused: Callable[[str], bool] = lambda name: False
    kv_scales: dict[int, dict[str, float]] = field(default_factory=dict)
    # checkpoint module name → parameter-name prefix of its shard in a per-shard fused layer
    _shard_prefix: dict[str, str] = field(default_factory=dict)
    chosen: dict[str, QuantScheme] = field(default_factory=dict)  # layer prefix → its scheme
    sources: dict[str, list[str]] = field(default_factory=dict)  # layer prefix → checkpoint modules

    def prepare(self, device, dtype) -> None:
        """Called by the runner before the model is built; online plans learn where to quantize."""

    def scheme_for(self, prefix: str, sources: list[str]) -> QuantScheme:
        """The scheme for the linear layer at `prefix`, fused from the checkpoint's `sources`."""
        specs = [self.spec_of(s) for s in sources]
        if all(s == specs[0] for s in specs):
            scheme = make_scheme(specs[0])
        else:
            from lowbit.quant.schemes.per_shard import PerShardScheme

            scheme = PerShardScheme([make_scheme(s) for s in specs])
            for i, src in enumerate(sources):
                self._shard_prefix[src] = f"s{i}_"
        self.chosen[prefix] = scheme
        self.sources[prefix] = list(sources)
        return scheme

    def transform(self, name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """Rewrite a checkpoint tensor into canonical (name, tensor) pairs; collect KV scales."""
        out = []
        for n, t in self.rename(name, tensor):
            kv = _kv_scale_key(n)
            if kv is not None:
                self.kv_scales.setdefault(kv[0], {})[kv[1]] = float(t.float().max())
                continue
            module, _, param = n.rpartition(".")
            prefix = self._shard_prefix.get(module)
            out.append((f"{module}.{prefix}{param}" if prefix else n, t))
        return out

    def expected_unused(self, name: str) -> bool:
        """Whether a checkpoint tensor may be skipped (the format's metadata-only tensors)."""
        return self.unused(name)


def _kv_scale_key(name: str) -> tuple[int, str] | None:
    """`model.layers.L.self_attn.{k,v}_scale` (canonical name) → (L, "k" | "v")."""
    parts = name.split(".")
    if len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[3] == "self_attn":
        if parts[4] in ("k_scale", "v_scale"):
            return int(parts[2]), parts[4][0]
    return None
