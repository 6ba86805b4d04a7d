"""Continuous batching: decodes and prefill chunks under a token budget, preemption by recompute.

Pure Python (no torch). Each step the running sequences go first (oldest first), each taking one
token for decode or the next chunk of its prefill; then waiting sequences are admitted in arrival
order while the budget and KV blocks last. When a running sequence needs a block and none is free,
the newest running sequence is preempted: its blocks are freed and it waits, first in line, to be
recomputed from its prompt and the tokens it already produced. No request is ever dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from lowbit.engine.kv_cache import BlockAllocator
from lowbit.engine.request import Sequence, Status


@dataclass
class ScheduledSeq:
    """A sequence and how many of its uncached tokens this step computes."""

    seq: Sequence
    num_new: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches its last token, so a new one is sampled."""
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


class Scheduler:
    """Chooses which sequences run each step and owns their KV blocks."""

    def __init__(self, allocator: BlockAllocator, max_running: int, max_batched_tokens: int):
        self.allocator = allocator
        self.max_running = max_running
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        """This step's batch; empty only when there is no work."""
        budget = self.max_batched_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.reserve(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                batch.append(ScheduledSeq(seq, n))
                budget -= n
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.max_running:
                break
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.reserve(seq, seq.num_computed + n):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        return batch

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the sequence's block table to hold `num_tokens`; False when blocks run out
        (also the engine's overlapped decode step, which skips `schedule`)."""
        need = self.allocator.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        seq.block_table += self.allocator.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and put it first in line for recompute."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        """Return the sequence's KV blocks."""
        self.allocator.free(seq.block_table)
        seq.block_table = []

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence finished (or aborted) and free its blocks, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
