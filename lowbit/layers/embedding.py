"""Token embedding and the LM head that may share its weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class VocabEmbedding(nn.Module):
    """(T,) token ids → (T, hidden)."""

    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(
            torch.empty(vocab_size, hidden, dtype=dtype), requires_grad=False
        )

    def forward(self, ids: Tensor) -> Tensor:
        """Look the ids up."""
        return F.embedding(ids, self.weight)
