"""fp8 KV cache: close to a full-precision cache, with per-layer K/V scales from the checkpoint or
calibrated at start-up (lowbit/engine/kv_scales.py)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_tokenizer

import lowbit
from lowbit.engine.kv_scales import calibrated_scale, resolve_kv_scales
from lowbit.layers.attention import KVCache

TEXT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea, "
    "there lived an old fisherman who went out every morning before the sun rose."
)
DEMO = Path(lowbit.__file__).parent / "demo_model"
FIXTURES = Path(__file__).parent / "fixtures" / "quant"
# k_proj, v_proj ×256 and q_proj, o_proj ÷256: powers of two, so bf16 logits are unchanged, but
# |k| reaches ~3800 and |v| ~2100, far past e4m3's ±448 at scale 1.0.
BIG = 256.0
# Hand-written checkpoint scales for that model: the demo model's |k| ≤ 15, |v| ≤ 8.3.
K_SCALE, V_SCALE = BIG * 16 / 448, BIG * 9 / 448


def _top1_kl(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(
        got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none"
    )
    return top1, kl.sum(-1).mean().item()


@pytest.fixture(scope="module")
def reference():
    """Token ids of TEXT and the demo model's logits with a bf16 cache."""
    with lowbit.Engine(device="cpu") as engine:
        ids = [engine.tokenizer.encode(TEXT)]
        return ids, engine.logits(ids)


def _big_model(path: Path, kv_scales: bool) -> Path:
    """The demo model with K and V ×BIG (logits unchanged); optionally with k/v_scale tensors."""
    shutil.copytree(DEMO, path)
    sd = load_file(path / "model.safetensors")
    for name in list(sd):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            sd[name] = sd[name] * BIG
        elif name.endswith(("q_proj.weight", "o_proj.weight")):
            sd[name] = sd[name] / BIG
        if kv_scales and name.endswith("k_proj.weight"):
            attn = name.rsplit(".", 2)[0]  # model.layers.L.self_attn
            sd[f"{attn}.k_scale"] = torch.tensor(K_SCALE)
            sd[f"{attn}.v_scale"] = torch.tensor(V_SCALE)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _e4m3_engine(path: Path, caplog, level: int) -> lowbit.Engine:
    """An engine on `path` with an fp8_e4m3 cache, its start-up log captured at `level`."""
    with caplog.at_level(level):
        return lowbit.Engine(model_path=str(path), device="cpu", kv_cache_dtype="fp8_e4m3")


# e5m2 keeps 2 mantissa bits to e4m3's 3.
# Measured: top-1 0.97, KL 0.0024 (e4m3); 0.93, 0.0076 (e5m2).
@pytest.mark.parametrize(
    ("kv_dtype", "min_top1", "max_kl"), [("fp8_e4m3", 0.95, 0.01), ("fp8_e5m2", 0.9, 0.02)]
)
def test_fp8_kv_cache_close_to_full_precision_cache(kv_dtype, min_top1, max_kl, reference, caplog):
    """On the trained demo model, an fp8 cache keeps greedy next tokens (≥ 95%) and KL small."""
    ids, ref = reference
    with caplog.at_level(logging.WARNING):
        engine = lowbit.Engine(device="cpu", kv_cache_dtype=kv_dtype)
    assert "no KV-cache scales" in caplog.text
    with engine:
        assert engine.runner.kv_caches[0].k.dtype.itemsize == 1
        # |k|, |v| ≤ 15 fit the fp8 range: calibration keeps scale 1.0 exactly.
        assert all((c.k_scale, c.v_scale) == (1.0, 1.0) for c in engine.runner.kv_caches)
        got = engine.logits(ids)
    top1, kl = _top1_kl(got, ref)
    assert top1 >= min_top1, top1
    assert kl < max_kl, kl
    assert not torch.equal(got, ref)  # the cache really was fp8


def test_checkpoint_kv_scales_are_used(tmp_path, reference, caplog):
    """k_scale/v_scale tensors reach every layer's cache; without them e4m3 saturates."""
    ids, ref = reference
    engine = _e4m3_engine(_big_model(tmp_path / "big", kv_scales=True), caplog, logging.INFO)
    assert "the checkpoint's per-layer scales" in caplog.text
    with engine:
        scales = [(c.k_scale, c.v_scale) for c in engine.runner.kv_caches]
        assert scales == [pytest.approx((K_SCALE, V_SCALE))] * 8
        top1, kl = _top1_kl(engine.logits(ids), ref)
        assert top1 >= 0.95 and kl < 0.01, (top1, kl)
        for c in engine.runner.kv_caches:  # the same cache at scale 1.0: saturated
            c.k_scale = c.v_scale = 1.0
        top1_unscaled, _ = _top1_kl(engine.logits(ids), ref)
    assert top1_unscaled < 0.8, top1_unscaled


def test_calibration_raises_scales_of_out_of_range_layers(tmp_path, reference, caplog):
    """No checkpoint scales, |k| past ±448: each layer gets max(1, 2·amax/448) from start-up."""
    ids, ref = reference
    engine = _e4m3_engine(_big_model(tmp_path / "big", kv_scales=False), caplog, logging.WARNING)
    assert "calibrated them on a start-up prefill" in caplog.text
    with engine:
        caches = engine.runner.kv_caches
        assert [(c.k_scale, c.v_scale) for c in caches] == engine.runner.kv_scales
        assert all(c.k_scale > 2.0 and c.v_scale > 1.0 for c in caches)
        assert all(c.k_scale < K_SCALE * 2 for c in caches)  # close to the amax, not blown up
        top1, kl = _top1_kl(engine.logits(ids), ref)
    assert top1 >= 0.95 and kl < 0.01, (top1, kl)


def test_checkpoint_kv_scales_unused_without_fp8_cache(tmp_path, caplog):
    """kv_cache_dtype auto: the checkpoint's scales are ignored, and the log says so."""
    path = _big_model(tmp_path / "big", kv_scales=True)
    with caplog.at_level(logging.INFO), lowbit.Engine(model_path=str(path), device="cpu") as e:
        assert all((c.k_scale, c.v_scale) == (1.0, 1.0) for c in e.runner.kv_caches)
        assert e.runner.kv_caches[0].k.dtype == torch.bfloat16
    assert "unused with kv_cache_dtype=auto" in caplog.text


def test_modelopt_kv_scales_reach_the_cache(tmp_path):
    """ModelOpt's k_proj.k_scale/v_proj.v_scale are the cache's scales and bring its logits closer
    to ModelOpt's own fp8-KV reference than scale 1.0 does."""
    d = tmp_path / "modelopt_fp8_kv"
    shutil.copytree(FIXTURES / "modelopt_fp8_kv", d)
    make_tokenizer(d, 384)
    sd = load_file(d / "model.safetensors")
    ref = torch.load(d / "reference.pt")
    kw = dict(model_path=str(d), dtype="float32", device="cpu", kv_cache_dtype="fp8_e4m3")
    with lowbit.Engine(**kw) as engine:
        for i, c in enumerate(engine.runner.kv_caches):
            attn = f"model.layers.{i}.self_attn"
            assert c.k_scale == pytest.approx(float(sd[f"{attn}.k_proj.k_scale"]))
            assert c.v_scale == pytest.approx(float(sd[f"{attn}.v_proj.v_scale"]))
        scaled = engine.logits(ref["ids"].tolist())
        for c in engine.runner.kv_caches:
            c.k_scale = c.v_scale = 1.0
        unscaled = engine.logits(ref["ids"].tolist())

    def err(x):
        return float((x - ref["logits"]).norm() / ref["logits"].norm())

    # Measured < 5e-6 with the scales (ModelOpt's own fake-quant reference) vs 0.059 at 1.0
    # (|k| ≤ 5.5 sits in e4m3's subnormals there).
    assert err(scaled) < 1e-3 and err(unscaled) > 0.02, (err(scaled), err(unscaled))


def test_calibrated_scale_rule():
    """max(1, 2·amax/fp8_max): 1.0 within range, proportional past it."""
    assert calibrated_scale(15.0, torch.float8_e4m3fn) == 1.0
    assert calibrated_scale(0.0, torch.float8_e4m3fn) == 1.0
    assert calibrated_scale(896.0, torch.float8_e4m3fn) == 4.0
    assert calibrated_scale(896.0, torch.float8_e5m2) == 1.0


def test_resolve_kv_scales_fills_missing_layers_only():
    """Checkpoint scales win; calibration runs only when a layer lacks one; 1.0 off fp8."""
    calls = []

    def calibrate():
        calls.append(1)
        return {0: (10.0, 10.0), 1: (448.0, 2240.0)}

    fp8 = torch.float8_e4m3fn
    full = {0: {"k": 0.5, "v": 0.25}, 1: {"k": 2.0, "v": 3.0}}
    assert resolve_kv_scales(fp8, "fp8_e4m3", full, 2, calibrate) == [(0.5, 0.25), (2.0, 3.0)]
    assert not calls
    partial = {0: {"k": 0.5, "v": 0.25}, 1: {"k": 2.0}}
    assert resolve_kv_scales(fp8, "fp8_e4m3", partial, 2, calibrate) == [(0.5, 0.25), (2.0, 10.0)]
    assert resolve_kv_scales(fp8, "fp8_e4m3", {}, 2, calibrate) == [(1.0, 1.0), (2.0, 10.0)]
    assert len(calls) == 2
    assert resolve_kv_scales(torch.bfloat16, "auto", full, 2, calibrate) == [(1.0, 1.0)] * 2
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("scales", "match"),
    [
        ({0: {"k": 0.0, "v": 1.0}}, r"layers\.0\.self_attn\.k_scale is 0\.0"),
        ({1: {"k": 1.0, "v": float("nan")}}, r"layers\.1\.self_attn\.v_scale is nan"),
        ({5: {"k": 1.0, "v": 1.0}}, "scales for layer 5, but the model has 2 layers"),
    ],
)
def test_bad_checkpoint_kv_scales_are_named(scales, match):
    with pytest.raises(ValueError, match=match):
        resolve_kv_scales(torch.float8_e4m3fn, "fp8_e4m3", scales, 2, dict)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_store_saturates(dtype):
    """Past the range, the CPU store clamps to the largest finite value, as the Triton one does."""
    top = torch.finfo(dtype).max
    cache = KVCache(torch.zeros(4, 1, 2, dtype=dtype), torch.zeros(4, 1, 2, dtype=dtype), 2.0, 2.0)
    x = torch.tensor([[[1e9, -1e9]]])  # (T=1, Hkv=1, D=2)
    cache.write(torch.tensor([3]), x, x)
    k, v = cache.read(torch.tensor([3]), torch.float32)
    assert k.tolist() == [[[2 * top, -2 * top]]] and torch.equal(k, v)
