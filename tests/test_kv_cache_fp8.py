"""fp8 KV cache: close to a full-precision cache; no checkpoint scales → scale 1.0, warned."""

from __future__ import annotations

import logging

import pytest
import torch

import lowbit

TEXT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea, "
    "there lived an old fisherman who went out every morning before the sun rose."
)


# e5m2 keeps 2 mantissa bits to e4m3's 3.
# Measured: top-1 0.97, KL 0.0024 (e4m3); 0.93, 0.0076 (e5m2).
@pytest.mark.parametrize(
    ("kv_dtype", "min_top1", "max_kl"), [("fp8_e4m3", 0.95, 0.01), ("fp8_e5m2", 0.9, 0.02)]
)
def test_fp8_kv_cache_close_to_full_precision_cache(kv_dtype, min_top1, max_kl, caplog):
    """On the trained demo model, an fp8 cache keeps greedy next tokens (≥ 95%) and KL small."""
    with lowbit.Engine(device="cpu") as ref_engine:
        ids = [ref_engine.tokenizer.encode(TEXT)]
        ref = ref_engine.logits(ids)
    with caplog.at_level(logging.WARNING):
        engine = lowbit.Engine(device="cpu", kv_cache_dtype=kv_dtype)
    assert "no KV-cache scales" in caplog.text
    with engine:
        assert engine.runner.kv_caches[0].k.dtype.itemsize == 1
        got = engine.logits(ids)
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = (
        torch.nn.functional.kl_div(
            got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none"
        )
        .sum(-1)
        .mean()
        .item()
    )
    assert top1 >= min_top1, top1
    assert kl < max_kl, kl
    assert not torch.equal(got, ref)  # the cache really was fp8
