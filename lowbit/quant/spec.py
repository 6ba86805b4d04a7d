"""QuantPlan: which scheme each linear layer of a model gets, decided before any weight is read."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from lowbit.quant.scheme import QuantScheme, scheme_class


@dataclass
class QuantPlan:
    """Module name → scheme, plus the checkpoint-name rewriting a format needs.

    The unquantized plan gives every layer `UnquantizedScheme`; format parsers build richer plans.
    """

    method: str | None = None
    description: str = "unquantized"
    per_module: dict[str, str] = field(default_factory=dict)

    def scheme_for(self, prefix: str, sources: list[str]) -> QuantScheme:
        """The scheme for the linear layer at `prefix`, fused from the checkpoint's `sources`.

        `sources` are the checkpoint module names behind the layer, e.g. a fused qkv_proj has
        [".../q_proj", ".../k_proj", ".../v_proj"]; ignore lists and per-module overrides name them.
        """
        return scheme_class(self.per_module.get(prefix, "unquantized"))()

    def transform(self, name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """Rewrite one checkpoint tensor into canonical (name, tensor) pairs (identity here)."""
        return [(name, tensor)]

    def expected_unused(self, name: str) -> bool:
        """Whether a checkpoint tensor may be skipped (none are, for unquantized checkpoints)."""
        return False
