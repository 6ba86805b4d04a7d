"""What every format parser shares: the checkpoint's tensor index, name matching, the result."""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

from lowbit.quant.spec import QuantSpec


@dataclass(frozen=True)
class TensorInfo:
    """A checkpoint tensor's header entry (no data read)."""

    dtype: str
    shape: tuple[int, ...]


class TensorIndex:
    """Names, dtypes and shapes of every safetensors tensor in a checkpoint directory."""

    def __init__(self, entries: dict[str, TensorInfo]):
        self.entries = entries

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> TensorIndex:
        """Read only the safetensors headers."""
        entries = {}
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name != "__metadata__":
                    entries[name] = TensorInfo(meta["dtype"], tuple(meta["shape"]))
        return cls(entries)

    def has(self, module: str, param: str) -> bool:
        """Whether `<module>.<param>` is in the checkpoint."""
        return f"{module}.{param}" in self.entries

    def get(self, module: str, param: str) -> TensorInfo | None:
        """The header entry of `<module>.<param>`, if present."""
        return self.entries.get(f"{module}.{param}")


def read_tensor_names(model_dir: str | Path) -> list[str]:
    """All tensor names (for tests and tools)."""
    names: list[str] = []
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            names += list(fh.keys())
    return names


def ct_match(name: str, pattern: str) -> bool:
    """compressed-tensors: `re:` regex (re.match), else the module name or the class "Linear"."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern in (name, "Linear")


def wildcard_match(name: str, pattern: str) -> bool:
    """ModelOpt exclude_modules: fnmatch wildcards (older exports: substrings)."""
    return fnmatch.fnmatchcase(name, pattern) or ("*" not in pattern and pattern in name)


def substring_match(name: str, pattern: str) -> bool:
    """AWQ / GPTQ / bitsandbytes module lists: substrings; FP8 also accepts `re:` regexes."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern in name


@dataclass
class FormatResult:
    """A parsed checkpoint format: per-module specs plus how its tensors are named.

    `kind` says what the checkpoint is in words (for messages and the override table) and
    `accepts` lists the `--quantization` values that mean this checkpoint.
    """

    method: str
    kind: str
    specs: dict[str, QuantSpec | None]
    accepts: tuple[str, ...]
    renames: dict[str, str] = field(default_factory=dict)  # checkpoint suffix → canonical suffix
    unused_suffixes: tuple[str, ...] = ()
    kv_names: dict[str, str] = field(default_factory=dict)  # producer suffix → "k_scale"/"v_scale"
    convert: Callable[[str, Tensor], list[tuple[str, Tensor]]] | None = None  # per-tensor fixes


def linear_modules(index: TensorIndex, suffixes: tuple[str, ...]) -> list[str]:
    """Module names that own a tensor ending in one of `suffixes` (e.g. ".qweight", ".weight")."""
    out = set()
    for name in index.entries:
        for s in suffixes:
            if name.endswith(s):
                out.add(name[: -len(s)])
    return sorted(out)
