"""End to end on the GPU: logits match the CPU engine; CUDA-graph decode matches eager decode."""

from __future__ import annotations

import pytest
import torch
from gpu_util import gpu_device, rel_err  # noqa: F401

import lowbit

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    """A tiny bf16 Llama (head_dim 32, GQA) saved to disk."""
    from tiny import make_tiny_model

    path = tmp_path_factory.mktemp("gpu_llama")
    make_tiny_model(path, "llama", dtype=torch.bfloat16)
    return path


def test_gpu_logits_match_cpu(bf16_llama, dev):
    """Teacher-forced logits (prefill kernel over several sequences) equal the CPU path's."""
    if dev.type != "cuda":
        pytest.skip("compares CUDA against CPU")
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 384, (n,), generator=gen).tolist() for n in (5, 70, 129)]
    with lowbit.Engine(str(bf16_llama), device="cpu") as cpu:
        ref = cpu.logits(ids)
    # KV cache sized from free memory: the sizing warm-up runs before graphs are captured.
    with lowbit.Engine(str(bf16_llama), device="cuda", mem_fraction_static=0.5) as gpu:
        assert gpu.runner.graphs
        got = gpu.logits(ids)
    for b, row in enumerate(ids):
        assert rel_err(got[b, : len(row)], ref[b, : len(row)]) < 2e-2


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
def test_cuda_graph_decode_matches_eager(bf16_llama, dev, kv_cache_dtype):
    """Greedy decode of a ragged batch: graph replay (padded buckets) == eager, token for token."""
    if dev.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 384, (n,), generator=gen).tolist() for n in (3, 40, 17, 100, 9)]
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    outs = {}
    for disable in (True, False):
        with lowbit.Engine(
            str(bf16_llama), device="cuda", max_total_tokens=4096, disable_cuda_graph=disable,
            kv_cache_dtype=kv_cache_dtype,
        ) as engine:  # fmt: skip
            assert bool(engine.runner.graphs) is not disable
            outs[disable] = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
    assert outs[False] == outs[True]


def test_graph_replay_logits_equal_eager_forward(bf16_llama, dev):
    """One decode step of 3 sequences through the bucket-4 graph equals the eager forward."""
    if dev.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    with lowbit.Engine(str(bf16_llama), device="cuda", max_total_tokens=4096) as engine:
        runner = engine.runner
        tables, lens = [[0, 1], [2], [3, 4, 5]], [20, 9, 40]
        for t, n in zip(tables, lens):
            ids = torch.randint(3, 384, (n - 1,), device="cuda")
            runner.forward(ids, [n - 1], [n - 1], [t], logits_at=[n - 2])
        step = torch.tensor([7, 8, 9], device="cuda")
        args = (step, lens, [1, 1, 1], tables)
        assert runner._graph_bucket(lens, [1, 1, 1], None, [0, 1, 2]) == 4
        graph_logits = runner.forward(*args, logits_at=[0, 1, 2]).clone()
        graphs, runner.graphs = runner.graphs, {}
        eager = runner.forward(*args, logits_at=[0, 1, 2])
        runner.graphs = graphs
        assert torch.isfinite(graph_logits).all()
        assert rel_err(graph_logits, eager) < 1e-2


def test_overlap_schedule_matches_plain_on_cuda(bf16_llama, dev):
    """overlap_schedule with CUDA graphs: the pinned token copy and its event hand the host
    the right tokens — a ragged greedy batch with stops comes out as without overlap."""
    if dev.type != "cuda":
        pytest.skip("the pinned copy and the event are CUDA's")
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 384, (n,), generator=gen).tolist() for n in (3, 40, 17, 9)]
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in (1, 5, 30, 64)]
    outs = {}
    for overlap in (False, True):
        with lowbit.Engine(
            str(bf16_llama), device="cuda", max_total_tokens=4096, overlap_schedule=overlap
        ) as engine:  # fmt: skip
            assert engine.runner.graphs
            outs[overlap] = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
    assert outs[True] == outs[False]
