"""The quality gate: evaluate an export against its source on held-out text, judge the numbers.

The export is loaded by lowbit's own Engine when its format parser can read it; otherwise the
gate reads it back with `readback` (formats.md's dequant rules) into a fake-quantized
transformers model, and the report says which was used.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from lowbit.tools.eval import (
    eval_windows,
    evaluate,
    hf_scorer,
    score_then_reference,
    scoring_engine,
)
from lowbit.tools.quantize.methods import Method

logger = logging.getLogger(__name__)
EVAL_SEQ_LEN = 512


def evaluate_export(src_dir: Path, export_dir: Path, max_tokens: int, device=None):
    """(EvalResult of the export vs the source on built-in held-out text, how it was loaded).

    With lowbit's Engine the export is scored first, released, then the source: one model in
    device memory at a time (an 8B source in float32 alone takes 32 GB).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.tools.quantize.simulate import from_export

    tok = AutoTokenizer.from_pretrained(src_dir)
    try:
        quant = scoring_engine(str(export_dir), EVAL_SEQ_LEN, device=device, dtype="float32")
    except (ValueError, KeyError, NotImplementedError, TypeError, ImportError) as e:
        logger.info("lowbit cannot load the export yet (%s); evaluating its readback", e)
        why = str(e)
    else:
        try:
            seq = min(EVAL_SEQ_LEN, quant.context_length - 1)
            wins = eval_windows(tok, None, max_tokens, seq)
        except BaseException:
            quant.shutdown()
            raise
        load = lambda: scoring_engine(str(src_dir), EVAL_SEQ_LEN, device=device, dtype="float32")
        return score_then_reference(quant, wins, load), "lowbit Engine"
    dev = device or "cpu"
    model = from_export(src_dir, export_dir, dev)
    ref = AutoModelForCausalLM.from_pretrained(src_dir, dtype="float32").to(dev).eval()
    seq = min(EVAL_SEQ_LEN, ref.config.max_position_embeddings)
    wins = eval_windows(tok, None, max_tokens, seq)
    how = f"readback dequantization in transformers (lowbit loader: {why})"
    return evaluate(hf_scorer(model), wins, hf_scorer(ref)), how


def run_gate(src_dir, export_dir, method: Method, max_tokens, limits: dict, device=None) -> dict:
    """Eval numbers, thresholds and the verdict, ready for quantization_report.json.

    limits: optional overrides {"max_kl", "max_ppl_ratio", "min_top1"} (None = method default).
    """
    res, how = evaluate_export(Path(src_dir), Path(export_dir), max_tokens, device)
    max_kl = limits.get("max_kl") or method.max_kl
    max_ratio = limits.get("max_ppl_ratio") or method.max_ppl_ratio
    min_top1 = limits.get("min_top1")
    reasons = []
    if not all(math.isfinite(v) for v in (res.perplexity, res.kl_mean, res.kl_p99)):
        reasons.append("non-finite perplexity or KL (NaN/inf logits)")
    else:
        if res.kl_mean > max_kl:
            reasons.append(f"mean KL {res.kl_mean:.4f} > {max_kl} allowed for {method.name}")
        ratio = res.perplexity / res.reference_perplexity
        if ratio > max_ratio:
            reasons.append(f"perplexity grew {ratio:.3f}x > {max_ratio}x allowed")
    if min_top1 is not None and res.top1_agreement < min_top1:
        reasons.append(f"top-1 agreement {res.top1_agreement:.4f} < {min_top1} required")
    return {
        "eval": res.to_dict(),
        "evaluated_with": how,
        "passed": not reasons,
        "gate": {"max_kl": max_kl, "max_ppl_ratio": max_ratio, "min_top1": min_top1},
        "reasons": reasons,
    }
