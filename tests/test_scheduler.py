"""Block allocator and scheduler, with no model: a fake step that 'samples' token 7."""

from __future__ import annotations

import random

import pytest
import torch

from lowbit.engine.kv_cache import BlockAllocator
from lowbit.engine.request import SamplingParams, Sequence
from lowbit.engine.scheduler import Scheduler


def test_allocator_hands_out_and_takes_back():
    """Blocks come out once each, go back, and a double free is caught."""
    alloc = BlockAllocator(4, 16)
    a = alloc.allocate(3)
    assert len(set(a)) == 3 and alloc.num_free == 1
    with pytest.raises(RuntimeError, match="asked for 2 KV blocks, 1 free"):
        alloc.allocate(2)
    alloc.free(a)
    assert alloc.num_free == 4
    with pytest.raises(RuntimeError, match="freed twice"):
        alloc.free(a[:1])
    assert alloc.blocks_for(16) == 1 and alloc.blocks_for(17) == 2


def _run(sched: Scheduler, seqs: list[Sequence], max_steps: int = 10_000) -> int:
    """Drive the scheduler like the engine does; returns the number of steps."""
    for seq in seqs:
        sched.add(seq)
    steps = 0
    while sched.has_work():
        batch = sched.schedule()
        assert batch, "scheduler returned nothing while work remains"
        assert sum(s.num_new for s in batch) <= sched.max_batched_tokens
        held = [b for s in sched.running for b in s.block_table]
        assert len(held) == len(set(held)), "a block is held by two sequences"
        for s in batch:
            assert len(s.seq.block_table) * 16 >= s.seq.num_computed + s.num_new
            samples = s.samples
            s.seq.num_computed += s.num_new
            if samples:
                s.seq.output_ids.append(7)
                if len(s.seq.output_ids) >= s.seq.params.max_new_tokens:
                    sched.finish(s.seq, "length")
        steps += 1
        assert steps < max_steps
    return steps


def _seqs(n: int, rng: random.Random) -> list[Sequence]:
    """Sequences of mixed prompt and output lengths."""
    return [
        Sequence(
            str(i), 0, [1] * rng.randint(1, 90), SamplingParams(max_new_tokens=rng.randint(1, 40))
        )
        for i in range(n)
    ]


def test_all_finish_and_blocks_return():
    """Many sequences, ample cache: everything finishes, every block is free again."""
    alloc = BlockAllocator(200, 16)
    sched = Scheduler(alloc, max_running=8, max_batched_tokens=64)
    seqs = _seqs(30, random.Random(0))
    _run(sched, seqs)
    assert all(s.finished and len(s.output_ids) == s.params.max_new_tokens for s in seqs)
    assert alloc.num_free == 200 and sched.num_preemptions == 0


def test_preemption_when_blocks_run_out():
    """A cache too small for all at once: preemption happens, nothing is dropped or lost."""
    alloc = BlockAllocator(12, 16)  # 192 tokens; each sequence needs up to 130
    sched = Scheduler(alloc, max_running=16, max_batched_tokens=256)
    seqs = _seqs(20, random.Random(1))
    _run(sched, seqs)
    assert sched.num_preemptions > 0
    assert all(s.finished and len(s.output_ids) == s.params.max_new_tokens for s in seqs)
    assert alloc.num_free == 12


def test_chunked_prefill_respects_budget():
    """A prompt longer than the token budget is prefilled in chunks, decodes ride along."""
    alloc = BlockAllocator(64, 16)
    sched = Scheduler(alloc, max_running=4, max_batched_tokens=32)
    long = Sequence("long", 0, [1] * 100, SamplingParams(max_new_tokens=2))
    steps = _run(sched, [long])
    assert steps == 4 + 1  # ceil(100 / 32) prefill chunks, then one decode


def test_abort_frees_blocks_of_waiting_and_running():
    """finish() on a running and on a waiting sequence frees their blocks."""
    alloc = BlockAllocator(4, 16)
    sched = Scheduler(alloc, max_running=1, max_batched_tokens=64)
    a = Sequence("a", 0, [1] * 20, SamplingParams())
    b = Sequence("b", 0, [1] * 20, SamplingParams())
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert a in sched.running and b in sched.waiting and alloc.num_free == 2
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert alloc.num_free == 4 and not sched.has_work()


def test_token_slice_equals_slicing_token_ids():
    """`Sequence.token_slice` (what a step reads) is token_ids[start:stop] for every range
    across the prompt / output boundary, empty ones and an empty output included."""
    seq = Sequence("r", 0, list(range(100, 107)), SamplingParams())
    for out in ([], [7, 8, 9]):
        seq.output_ids = list(out)
        n = seq.num_tokens
        for start in range(n + 1):
            for stop in range(start, n + 1):
                assert seq.token_slice(start, stop) == seq.token_ids[start:stop], (start, stop)


def test_block_table_rows_equal_padded_tables_as_tables_grow_and_change():
    """The decode graph's incremental host table equals `padded_tables` step after step while
    tables grow in place, get replaced (freed / preempted), the batch shrinks, grows and
    reorders, and a row gets a shorter table than it had."""
    from lowbit.layers.attention import BlockTableRows, padded_tables

    rng = random.Random(0)
    rows = BlockTableRows(8, 64)
    seqs = [[rng.randrange(1000) for _ in range(rng.randint(1, 5))] for _ in range(12)]
    for step in range(300):
        batch = rng.sample(range(len(seqs)), rng.randint(1, 8))
        for i in batch:
            r = rng.random()
            if r < 0.3 and len(seqs[i]) < 64:
                seqs[i] += [rng.randrange(1000)]  # the scheduler's in-place growth
            elif r < 0.35:
                seqs[i] = [rng.randrange(1000)]  # freed and readmitted: a new, shorter list
        tables = [seqs[i] for i in batch]
        assert torch.equal(rows.update(tables), padded_tables(tables)), step
