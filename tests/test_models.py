"""Every architecture: logits and greedy tokens equal transformers' on tiny random models."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHS, make_tiny_model

import lowbit


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over all logits."""
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_model(request, tmp_path_factory):
    """(arch, path, HF float32 model) for every supported architecture."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, make_tiny_model(path, request.param)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_logits_match_transformers(arch_model, dtype, tol):
    """Teacher-forced logits at several lengths, float32 and bf16."""
    arch, path, hf = arch_model
    gen = torch.Generator().manual_seed(1)
    with lowbit.Engine(str(path), dtype=dtype, device="cpu") as engine:
        for length in (1, 7, 33, 130):
            ids = torch.randint(3, 384, (2, length), generator=gen)
            ours = engine.logits(ids.tolist())
            with torch.no_grad():
                ref32 = hf.float()(ids).logits
                ref = hf.to(getattr(torch, dtype))(ids).logits.float()
            assert _rel_err(ours, ref) < tol, (arch, dtype, length)
            # In bf16, no further from the float32 truth than transformers' own bf16 run.
            assert _rel_err(ours, ref32) <= 1.25 * _rel_err(ref, ref32) + 1e-5, (arch, length)
    hf.float()


def test_greedy_matches_transformers_generate(arch_model):
    """Greedy decoding gives the same tokens as `transformers.generate`."""
    arch, path, hf = arch_model
    prompt = [1, 17, 42, 99, 5]
    with lowbit.Engine(str(path), dtype="float32", device="cpu") as engine:
        out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True})
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )[0, len(prompt):].tolist()  # fmt: skip
    assert out[0].outputs[0].token_ids == ref, arch


def test_sharded_checkpoint_with_index(tmp_path):
    """A checkpoint split into several safetensors files with an index loads the same."""
    hf = make_tiny_model(tmp_path / "one", "qwen2")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for f in (tmp_path / "one").glob("tokenizer*"):
        (tmp_path / "sharded" / f.name).write_bytes(f.read_bytes())
    ids = [[1, 2, 3, 4, 5, 6]]
    with lowbit.Engine(str(tmp_path / "one"), dtype="float32", device="cpu") as a:
        ref = a.logits(ids)
    with lowbit.Engine(str(tmp_path / "sharded"), dtype="float32", device="cpu") as b:
        assert torch.equal(b.logits(ids), ref)


def test_dummy_load_format(tiny_llama):
    """load_format='dummy' gives finite logits without reading the weights."""
    with lowbit.Engine(str(tiny_llama), load_format="dummy", device="cpu") as engine:
        logits = engine.logits([[1, 2, 3]])
    assert logits.shape == (1, 3, 384) and torch.isfinite(logits).all()
