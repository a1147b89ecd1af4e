"""Continuous batching: which sequences run this step, and how many tokens each. No torch here.

Every step has a token budget (`max_num_batched_tokens`). Running sequences go first, in arrival
order: a decode costs one token, an unfinished prefill takes a chunk of what budget is left.
Then waiting sequences are admitted FCFS while budget, `max_num_seqs` and free blocks allow.
When a running sequence needs a block and none is free, the newest running sequence is
preempted (its blocks freed, recomputed later from its tokens): never a crash.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from appliance.engine.block_manager import BlockManager
from appliance.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on
    sample: bool  # the chunk reaches the last known token: sample the next one


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    num_batched_tokens: int = 0
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), before the forward
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # arrival order
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queues
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked child (n > 1): it already holds blocks, it decodes next step."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason, *, free_blocks: bool = True) -> None:
        """Mark finished and free its blocks. Safe to call once per sequence, in any state.

        free_blocks=False: the caller frees them later (async scheduling: a step still running
        on the device writes into them).
        """
        if seq.status == SequenceStatus.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if free_blocks:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running sequences, oldest first. Preempt from the newest end when blocks run out.
        i = 0
        num_finishing = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.finish_pending:
                num_finishing += 1  # leaves when the engine processes its last token
                i += 1
                continue
            num_known = len(seq.token_ids)
            num_new = min(num_known - seq.num_computed_tokens, budget)
            assert num_new > 0, f"{seq} is running with nothing to compute"
            target = seq.num_computed_tokens + num_new
            if not bm.covers(seq, target):  # NOTE: most decode steps need no new block
                while not bm.can_grow(seq, target):
                    victim = self.running[-1]
                    self._preempt(victim, out)
                    if victim is seq:
                        break
                if seq.status != SequenceStatus.RUNNING:
                    break  # it preempted itself: everything after it is gone too
                bm.grow(seq, target)
            out.scheduled.append(ScheduledSequence(seq, num_new, target == num_known))
            budget -= num_new
            i += 1

        # 2. Waiting sequences, FCFS, while there is room. None are admitted past one that does
        # not fit, so a long prompt is not starved by short ones behind it.
        while (self.waiting and budget > 0 and len(self.running) - num_finishing < self.max_num_seqs
               and not out.preempted):
            seq = self.waiting[0]
            if not bm.can_allocate(seq):
                break
            bm.allocate(seq)
            num_new = seq.num_uncomputed_tokens
            if num_new > budget:
                if not self.enable_chunked_prefill and out.scheduled:
                    bm.free(seq)
                    break
                num_new = budget
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            target = seq.num_computed_tokens + num_new
            out.scheduled.append(ScheduledSequence(seq, num_new, target == len(seq)))
            budget -= num_new

        out.num_batched_tokens = self.max_num_batched_tokens - budget
        out.blocks_to_copy = bm.take_pending_copies()
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute preemption: drop its K/V, keep its tokens, put it first in line."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def update(self, out: SchedulerOutput, sampled: dict[int, int]) -> None:
        """After the forward: advance computed counts, register full blocks, append sampled tokens.

        `sampled` maps seq_id -> the token sampled for every scheduled sequence with sample=True.
        Finishing (EOS, stop strings, lengths) is decided by the engine, which calls `finish`.
        """
        for item in out.scheduled:
            seq = item.seq
            if seq.status != SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit(seq)
            if item.sample:
                seq.append_token(sampled[seq.seq_id])
