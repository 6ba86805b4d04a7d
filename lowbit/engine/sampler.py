"""Sampling on the device: penalties, temperature, top-k/p, min-p, per-request seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.engine.request import SamplingParams
from lowbit.kernels import dispatch


@dataclass
class SampleRow:
    """What the sampler needs of one sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None  # set for requests with a seed


def penalized(p: SamplingParams) -> bool:
    """Whether `_apply_penalties` changes this request's logits."""
    return p.repetition_penalty != 1.0 or bool(p.frequency_penalty or p.presence_penalty)


def _apply_penalties(logits: Tensor, rows: list[SampleRow]) -> Tensor:
    """Repetition (prompt and output), frequency and presence (output) penalties, in place."""
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_ids + row.output_ids)), device=logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if (p.frequency_penalty or p.presence_penalty) and row.output_ids:
            ids = torch.tensor(row.output_ids, device=logits.device)
            counts = torch.zeros_like(logits[i]).scatter_add_(
                0, ids, torch.ones_like(ids, dtype=logits.dtype)
            )
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def _filter(logits: Tensor, rows: list[SampleRow]) -> Tensor:
    """Temperature, then top-k, top-p and min-p masks, as probabilities (N, V)."""
    dev = logits.device
    temp = torch.tensor([r.params.temperature or 1.0 for r in rows], device=dev)
    logits = logits / temp[:, None]
    V = logits.shape[-1]
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else V for r in rows], device=dev)
    top_p = torch.tensor([r.params.top_p for r in rows], device=dev)
    min_p = torch.tensor([r.params.min_p for r in rows], device=dev)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
    rank = torch.arange(V, device=dev)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    before = probs.cumsum(-1) - probs
    drop = (before >= top_p[:, None]) | (probs < min_p[:, None] * probs[:, :1])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)
    return filtered.softmax(-1)


def sample(
    logits: Tensor, rows: list[SampleRow], generator: torch.Generator | None
) -> tuple[list[int], list[dict[int, float] | None]]:
    """(N, V) float32 logits → one token per row, and top-k logprobs where asked."""
    logprob_rows = [r.params.logprobs for r in rows]
    raw_logprobs = logits.log_softmax(-1) if any(k is not None for k in logprob_rows) else None
    token_list = sample_on_device(logits, rows, generator).tolist()
    logprobs: list[dict[int, float] | None] = [None] * len(rows)
    if raw_logprobs is not None:
        for i, k in enumerate(logprob_rows):
            if k is None:
                continue
            entry = {token_list[i]: raw_logprobs[i, token_list[i]].item()}
            if k > 0:
                top = raw_logprobs[i].topk(k)
                entry.update(zip(top.indices.tolist(), top.values.tolist()))
            logprobs[i] = entry
    return token_list, logprobs


def sample_on_device(
    logits: Tensor, rows: list[SampleRow], generator: torch.Generator | None
) -> Tensor:
    """(N, V) float32 logits → (N,) token ids on their device, with no host sync (penalties
    read the rows' token lists as they are now)."""
    if any(penalized(r.params) for r in rows):  # only then a copy (in place below)
        logits = _apply_penalties(logits.clone(), rows)
    tokens = dispatch.argmax(logits)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        probs = _filter(logits[idx], [rows[i] for i in random_rows])
        # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p; each seeded request
        # draws its own noise so its tokens do not depend on the rest of the batch.
        noise = torch.empty_like(probs).exponential_(generator=generator)
        for j, i in enumerate(random_rows):
            if rows[i].generator is not None:
                noise[j] = torch.empty_like(probs[j]).exponential_(generator=rows[i].generator)
        tokens[idx] = (probs / noise).argmax(-1)
    return tokens
