"""`lowbit eval`: perplexity, KL and top-1 agreement against a reference, per-layer error.

Both models score the same held-out token windows, teacher-forced. A *scorer* maps one window of
token ids to (logits (T, V) float32, [hidden state after each decoder layer (T, H)]); scorers exist
for lowbit's Engine and for a transformers module (used for in-memory fake-quantized models).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.tools.textdata import builtin_heldout_text, read_text_file, token_stream, windows

Scorer = Callable[[list[int]], tuple[Tensor, list[Tensor]]]


@dataclass
class EvalResult:
    """Quality of a model against a reference on the same tokens."""

    num_tokens: int
    perplexity: float
    reference_perplexity: float | None = None
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None
    layer_rel_error: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)

    def table(self) -> str:
        """Human-readable summary."""
        rows = [("tokens", f"{self.num_tokens}"), ("perplexity", f"{self.perplexity:.4f}")]
        if self.kl_mean is not None:
            rows += [
                ("reference perplexity", f"{self.reference_perplexity:.4f}"),
                ("KL mean (nats/token)", f"{self.kl_mean:.6f}"),
                ("KL p99", f"{self.kl_p99:.6f}"),
                ("top-1 agreement", f"{self.top1_agreement:.4f}"),
            ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.layer_rel_error:
            lines.append("per-layer relative output error ||h - h_ref|| / ||h_ref||:")
            lines += [f"  layer {i:>3}  {e:.6f}" for i, e in enumerate(self.layer_rel_error)]
        return "\n".join(lines)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a lowbit or transformers causal LM (both use `model.layers`)."""
    return model.model.layers


def _hooked(layers: nn.ModuleList, sink: list[Tensor]) -> list:
    """Record each layer's output hidden state (T, H) into `sink`."""

    def hook(_mod, _inp, out):
        # lowbit layers return (mlp_out, residual): the residual stream is their sum.
        h = out[0] + out[1] if isinstance(out, tuple) and len(out) == 2 else out
        h = h[0] if isinstance(h, tuple) else h
        sink.append(h.detach().reshape(-1, h.shape[-1]).float().cpu())

    return [layer.register_forward_hook(hook) for layer in layers]


def engine_scorer(engine) -> Scorer:
    """Scorer over a `lowbit.Engine` (hooks on its model's decoder layers). It holds the engine,
    not the layers, so `engine.shutdown()` frees the model while the scorer still exists."""

    def score(ids: list[int]) -> tuple[Tensor, list[Tensor]]:
        sink: list[Tensor] = []
        handles = _hooked(_decoder_layers(engine.runner.model), sink)
        try:
            logits = engine.logits([ids])[0]  # (T, V)
        finally:
            for h in handles:
                h.remove()
        return logits, sink

    return score


def hf_scorer(model: nn.Module) -> Scorer:
    """Scorer over a transformers causal LM module (e.g. a fake-quantized copy)."""
    layers = _decoder_layers(model)
    device = next(model.parameters()).device

    @torch.no_grad()
    def score(ids: list[int]) -> tuple[Tensor, list[Tensor]]:
        sink: list[Tensor] = []
        handles = _hooked(layers, sink)
        try:
            out = model(torch.tensor([ids], device=device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return out.logits[0].float().cpu(), sink

    return score


def evaluate(model: Scorer, wins: list[list[int]], reference: Scorer | None = None) -> EvalResult:
    """Score every window with `model` (and `reference`) and aggregate the metrics."""
    if not wins:
        raise ValueError("no evaluation windows: the data is shorter than one window")
    nll, ref_nll, kls, agree = [], [], [], []
    err_num: list[float] = []
    err_den: list[float] = []
    for ids in wins:
        logits, hs = model(ids)
        target = torch.tensor(ids[1:])
        logp = F.log_softmax(logits.float(), dim=-1)  # (T, V)
        nll.append(-logp[:-1].gather(1, target[:, None])[:, 0])
        if reference is None:
            continue
        ref_logits, ref_hs = reference(ids)
        ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
        ref_nll.append(-ref_logp[:-1].gather(1, target[:, None])[:, 0])
        # KL(ref || model) per position, in nats.
        kls.append((ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0))
        agree.append((ref_logp.argmax(-1) == logp.argmax(-1)).float())
        if not err_num:
            err_num, err_den = [0.0] * len(ref_hs), [0.0] * len(ref_hs)
        for i, (h, r) in enumerate(zip(hs, ref_hs)):
            err_num[i] += (h - r).pow(2).sum().item()
            err_den[i] += r.pow(2).sum().item()
    nll_t = torch.cat(nll).double()  # float64 sums: float32 means hide small ppl changes
    res = EvalResult(num_tokens=int(nll_t.numel()), perplexity=math.exp(nll_t.mean().item()))
    if reference is not None:
        kl = torch.cat(kls)
        res.reference_perplexity = math.exp(torch.cat(ref_nll).double().mean().item())
        res.kl_mean = kl.double().mean().item()
        res.kl_p99 = torch.quantile(kl, 0.99).item()
        res.top1_agreement = torch.cat(agree).mean().item()
        res.layer_rel_error = [math.sqrt(n / max(d, 1e-30)) for n, d in zip(err_num, err_den)]
    return res


def eval_windows(tokenizer, data: str | Path | None, max_tokens: int, seq_len: int):
    """Held-out windows: `data` file or the built-in held-out text, up to `max_tokens` tokens."""
    if max_tokens < 2 or seq_len < 2:
        raise ValueError(f"need max_tokens >= 2 and seq_len >= 2, got {max_tokens}, {seq_len}")
    docs = read_text_file(data) if data is not None else [builtin_heldout_text()]
    ids = token_stream(tokenizer, docs)[:max_tokens]
    seq_len = min(seq_len, len(ids))
    wins = windows(ids, seq_len)
    if not wins or seq_len < 2:
        raise ValueError(f"eval data {data or 'built-in'} has only {len(ids)} tokens; give more")
    return wins


def scoring_engine(model: str, seq_len: int, **kw):
    """An Engine for teacher-forced scoring only: a KV cache of one window, no CUDA graphs.

    Sizing the cache from free memory (the serving default) would leave nothing for a second
    engine, and scoring runs one window at a time.
    """
    from lowbit import Engine

    tokens = max(seq_len, 1) + 16  # the window, rounded up to whole blocks by the allocator
    return Engine(model_path=model, max_total_tokens=tokens, disable_cuda_graph=True,
                  show_progress=False, **kw)  # fmt: skip


def score_then_reference(engine, wins: list[list[int]], load_reference) -> EvalResult:
    """Score `wins` with `engine`, shut it down, then load the reference (`load_reference()`)
    and evaluate against it: one model in device memory at a time.

    The first model's logits and hidden states wait on the CPU meanwhile: per window of T
    tokens, T × (vocab + layers × hidden) float32 (≈ 0.5 GB at 512 tokens of an 8B model).
    """
    try:
        score = engine_scorer(engine)
        done = {tuple(ids): score(ids) for ids in wins}
    finally:
        engine.shutdown()
    reference = load_reference()
    try:
        return evaluate(lambda ids: done[tuple(ids)], wins, engine_scorer(reference))
    finally:
        reference.shutdown()


def run_eval(
    model: str,
    reference: str | None = None,
    data: str | None = None,
    max_tokens: int = 2048,
    seq_len: int = 512,
    dtype: str = "auto",
    device: str | None = None,
    quantization: str | None = None,
    torchao_config: str | None = None,
) -> EvalResult:
    """Load `model` (quantized online if asked), then `reference`, with lowbit; evaluate both.

    The models are scored one after the other, so the larger of the two must fit, not both.
    """
    engine = scoring_engine(model, seq_len, dtype=dtype, device=device,
                            quantization=quantization, torchao_config=torchao_config)  # fmt: skip
    try:
        seq_len = min(seq_len, engine.context_length - 1)
        wins = eval_windows(engine.tokenizer, data, max_tokens, seq_len)
    except BaseException:
        engine.shutdown()
        raise
    if reference is None:
        try:
            return evaluate(engine_scorer(engine), wins)
        finally:
            engine.shutdown()
    load = lambda: scoring_engine(reference, seq_len, dtype=dtype, device=device)
    return score_then_reference(engine, wins, load)


def eval_main(args) -> int:
    """`lowbit eval` entry: print a table or JSON."""
    res = run_eval(args.model, args.reference, args.data, args.max_tokens, args.seq_len,
                   args.dtype, args.device, args.quantization, args.torchao_config)  # fmt: skip
    print(json.dumps(res.to_dict(), indent=2) if args.json else res.table())
    return 0
