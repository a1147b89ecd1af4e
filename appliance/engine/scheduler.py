"""Continuous batching: which sequences run a step, and what their results do. No torch here.

The scheduler owns both ends of a step (vLLM v1's contract):

- `schedule()`: every step has a token budget (`max_num_batched_tokens`). Running sequences go
  first, in arrival order: a decode costs one token, an unfinished prefill takes a chunk of what
  budget is left. Then waiting sequences are admitted FCFS while budget, `max_num_seqs` and free
  blocks allow. When a running sequence needs a block and none is free, the newest running
  sequence is preempted (its blocks freed, recomputed later from its tokens): never a crash.
  The scheduled tokens are counted as computed at once (`ScheduledSequence.start` keeps where
  the step begins for the model runner).
- `after_launch(out)`: the async-scheduling hook. Every row that samples gets an output
  placeholder (`PLACEHOLDER_TOKEN_ID`), so the next `schedule()` can run before the sampled ids
  reach the host. A no-op in sync mode, where `update_from_output` appends the real ids.
- `update_from_output(out, sampled)`: the host side of a finished step: real ids in place of
  placeholders, hashes of blocks that filled (prefix cache), n > 1 forks, stop-token and length
  checks, finishing. Returns one `SequenceUpdate` per new token for the engine's output stage
  (detokenization, stop strings, deltas), which may still finish a sequence (`finish`).

Prompt blocks are hashed for the prefix cache when they are scheduled, not when computed: a
prompt admitted later in the same step (or in the next, scheduled while this one runs) hits them
and computes only what follows. That is safe because a step writes every row's K/V of a layer
before any row of that layer attends (`layers/attention.py`: store, then attend), later steps run
after it on the stream, and a block stays referenced (so never evicted and rewritten) while a
step that writes it is in flight. A burst of 256 prompts with one 2,048-token system prompt thus
computes that prompt once, not once per prompt admitted before the first prefill finished.
Blocks filled by generated tokens are hashed in the update, once their ids are known.

NOTE (async): a sequence finished while a step that contains it is still in flight keeps its
blocks until that step is resolved (`resolve`): the device may still be writing its K/V.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from appliance.engine.block_manager import BlockManager
from appliance.engine.outputs import TokenLogprob
from appliance.engine.sequence import PLACEHOLDER_TOKEN_ID, FinishReason, Sequence, SequenceStatus


# NOTE: the per-row, per-step objects here are msgspec structs with gc=False: hundreds are made
# every step, and as tracked objects they drove the cyclic GC (collections of the young
# generation every step or two, and full collections of the whole heap during a burst). They
# refer to sequences but nothing refers back to them, so they can never be part of a cycle.
class ScheduledSequence(msgspec.Struct, gc=False):
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from `start` on
    sample: bool  # the chunk reaches the last known token: sample the next one
    start: int = 0  # seq.num_computed_tokens before this step (its first position)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    num_batched_tokens: int = 0
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), before the forward
    preempted: list[Sequence] = field(default_factory=list)
    # Async scheduling: the step's sequences, and those finished while it was in flight.
    seq_ids: set[int] = field(default_factory=set)
    free_after: list[Sequence] = field(default_factory=list)
    resolved: bool = False  # its sampled ids are in the sequences' token lists
    # Cascade attention's shared prefix (BlockManager.common_prefix): leading blocks that many
    # of the step's tables start with (a table does when it lists the last one at the same index).
    # Looked for in decode-only steps of at least `common_prefix_min_seqs` sequences, else [].
    common_prefix_blocks: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class SampledTokens(Protocol):
    """One row's result (the sampler's SampleResult): n tokens on an n > 1 request's first step."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] | None


class SequenceUpdate(msgspec.Struct, gc=False):
    """A token a step produced for `seq` (its last token now). `seq.is_finished` tells whether a
    stop token or a length limit ended it; `stop_token`: its text must not be emitted."""

    seq: Sequence
    token_id: int
    logprob: TokenLogprob | None
    stop_token: bool = False
    forked: bool = False  # a sequence born this step (n > 1): its request must learn of it


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
        eos_token_ids: list[int] | tuple[int, ...] = (),
        async_scheduling: bool = False,
        common_prefix_min_seqs: int = 0,
        max_prefill_tokens_with_decodes: int = 0,
    ) -> None:
        self.block_manager = block_manager
        # In a step with decode rows, prompt tokens past this wait for a later step (0: no cap).
        self.max_prefill_tokens_with_decodes = max_prefill_tokens_with_decodes
        self.common_prefix_min_seqs = common_prefix_min_seqs  # 0: never computed
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.eos_token_ids = frozenset(eos_token_ids)
        self.async_scheduling = async_scheduling
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # arrival order
        self.num_preemptions = 0
        self.prompt_tokens_total = 0  # prompt tokens computed (prefix hits excluded), cumulative
        self.generation_tokens_total = 0
        self._unresolved: list[SchedulerOutput] = []  # async: launched steps not resolved yet

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

    def deferred_frees(self) -> list[Sequence]:
        """Async: finished sequences whose blocks wait for a step in flight to resolve."""
        return [seq for out in self._unresolved for seq in out.free_after]

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark finished and free its blocks (once no step in flight can write them). Safe to
        call once per sequence, in any state; a second call does nothing."""
        if seq.status == SequenceStatus.FINISHED:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        in_flight = next((o for o in reversed(self._unresolved) if seq.seq_id in o.seq_ids), None)
        if in_flight is not None:
            in_flight.free_after.append(seq)
        else:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        running = self.running
        scheduled = out.scheduled
        now = time.monotonic()
        num_prompt_computed = 0

        # 1. Running sequences, oldest first. Preempt from the newest end when blocks run out.
        # NOTE: one pass per step over up to max_num_seqs sequences: it also counts the tokens as
        # computed (a victim of preemption is always newer than the sequence being scheduled, so
        # nothing counted here is taken back).
        # Prompt tokens this step may take: the budget, or the cap when the step also decodes.
        prefill_left = budget
        cap = self.max_prefill_tokens_with_decodes
        if 0 < cap < budget and self.enable_chunked_prefill and any(
                not s.finish_pending and len(s.token_ids) - s.num_computed_tokens == 1 for s in running):
            prefill_left = cap
        i = 0
        num_finishing = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            if seq.finish_pending:
                num_finishing += 1  # leaves when the engine processes its last token
                i += 1
                continue
            num_known = len(seq.token_ids)
            start = seq.num_computed_tokens
            num_new = num_known - start
            if num_new > 1:  # a prompt chunk: within what the step may still prefill
                if prefill_left <= 0:
                    i += 1
                    continue  # waits for a later step, still running
                num_new = min(num_new, prefill_left, budget)
                prefill_left -= num_new
            if num_new > budget:
                num_new = budget
            assert num_new > 0, f"{seq} is running with nothing to compute"
            target = start + num_new
            if not bm.covers(seq, target):  # NOTE: most decode steps need no new block
                while not bm.can_grow(seq, target):
                    victim = running[-1]
                    self._preempt(victim, out)
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    break  # it preempted itself: everything after it is gone too
                bm.grow(seq, target)
            scheduled.append(ScheduledSequence(seq, num_new, target == num_known, start))
            seq.num_computed_tokens = target
            if start < seq.num_prompt_tokens:
                num_prompt_computed += min(target, seq.num_prompt_tokens) - start
                bm.commit(seq, min(target, seq.num_prompt_tokens))  # see "prompt blocks" above
            budget -= num_new
            i += 1

        # 2. Waiting sequences, FCFS, while there is room. None are admitted past one that does
        # not fit, so a long prompt is not starved by short ones behind it.
        while (self.waiting and budget > 0 and prefill_left > 0
               and len(self.running) - num_finishing < self.max_num_seqs and not out.preempted):
            seq = self.waiting[0]
            room = min(budget, prefill_left)
            # (with a sliding window, an admission covers the cached prefix and this step's chunk)
            if not bm.can_allocate(seq, max_new_tokens=room):
                break
            bm.allocate(seq, room)
            num_new = seq.num_uncomputed_tokens
            if num_new > room:
                if not self.enable_chunked_prefill and out.scheduled:
                    bm.free(seq)
                    break
                num_new = room
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            running.append(seq)
            start = seq.num_computed_tokens
            target = start + num_new
            scheduled.append(ScheduledSequence(seq, num_new, target == len(seq.token_ids), start))
            seq.num_computed_tokens = target
            if start < seq.num_prompt_tokens:
                num_prompt_computed += min(target, seq.num_prompt_tokens) - start
                bm.commit(seq, min(target, seq.num_prompt_tokens))  # see "prompt blocks" above
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            budget -= num_new
            prefill_left -= num_new

        out.num_batched_tokens = self.max_num_batched_tokens - budget
        out.blocks_to_copy = bm.take_pending_copies()
        if 0 < self.common_prefix_min_seqs <= len(out.scheduled) == out.num_batched_tokens:
            # The oldest, the middle and the newest: a burst's first prompts may hold private
            # copies of a prefix that later ones hit in the cache, late arrivals may share nothing.
            rows = out.scheduled
            candidates = (rows[0].seq, rows[len(rows) // 2].seq, rows[-1].seq)
            out.common_prefix_blocks = bm.common_prefix(candidates, self.common_prefix_min_seqs)
        self.prompt_tokens_total += num_prompt_computed
        if self.async_scheduling and scheduled:
            out.seq_ids = {item.seq.seq_id for item in scheduled}
            self._unresolved.append(out)
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

    # ------------------------------------------------------------------ after the launch
    def after_launch(self, out: SchedulerOutput) -> None:
        """The step is on the device (its rows' sample counts are read). Async: give every
        sampling row a placeholder, and stop scheduling rows whose next token is their last."""
        if not self.async_scheduling:
            for item in out.scheduled:
                if item.sample:
                    item.seq.pending_forks = 0  # its first step draws the n samples; later ones draw one
            return
        running = SequenceStatus.RUNNING
        max_model_len = self.max_model_len
        for item in out.scheduled:
            if not item.sample:
                continue
            seq = item.seq
            seq.pending_forks = 0
            if seq.status is not running:
                continue
            tokens = seq.token_ids
            tokens.append(PLACEHOLDER_TOKEN_ID)
            num_tokens = len(tokens)
            max_tokens = seq.sampling_params.max_tokens
            if num_tokens >= max_model_len or (max_tokens is not None
                                               and num_tokens - seq.num_prompt_tokens >= max_tokens):
                seq.finish_pending = True  # the stop check will end it: schedule no wasted step

    def resolve(self, out: SchedulerOutput, sampled: dict[int, SampledTokens]) -> None:
        """The step is done on the device: free what finished meanwhile, put the sampled ids in
        the token lists (async: over the placeholders). Idempotent."""
        if out.resolved:
            return
        self._release(out)
        finished = SequenceStatus.FINISHED
        for item in out.scheduled:
            seq = item.seq
            if item.sample and seq.status is not finished:  # a finished sequence's last step is dropped
                self._put_token(seq, sampled[seq.seq_id].token_ids[0])

    def _release(self, out: SchedulerOutput) -> None:
        """The step is off the device: the blocks of sequences finished meanwhile go back."""
        out.resolved = True
        if self.async_scheduling and out.seq_ids:
            self._unresolved.remove(out)
            for seq in out.free_after:
                self.block_manager.free(seq)
            out.free_after.clear()

    def _put_token(self, seq: Sequence, token: int) -> None:
        """(update_from_output does the same inline.)"""
        tokens = seq.token_ids
        if self.async_scheduling:
            assert tokens[-1] == PLACEHOLDER_TOKEN_ID, seq
            tokens[-1] = token
        else:
            tokens.append(token)

    # ------------------------------------------------------------------ update
    def update_from_output(self, out: SchedulerOutput, sampled: dict[int, SampledTokens]) -> list[SequenceUpdate]:
        """Apply a finished step (see the module docstring); returns the new tokens, in order.

        NOTE: one pass over the step's rows (this runs for every token of every sequence): each
        row's sampled id replaces its placeholder (unless `resolve` ran already), then its full
        blocks are hashed, forks made and the stop checks run.
        """
        put = not out.resolved
        if put:
            self._release(out)
        bm = self.block_manager
        block_size = bm.block_size
        sync = not self.async_scheduling
        finished = SequenceStatus.FINISHED
        running = SequenceStatus.RUNNING
        now = time.monotonic()
        updates: list[SequenceUpdate] = []
        for item in out.scheduled:
            seq = item.seq
            status = seq.status
            if status is finished:
                continue  # aborted, or finished by the step before
            tokens = seq.token_ids
            if item.sample:
                res = sampled[seq.seq_id]
                token = res.token_ids[0]
                if put:
                    if sync:
                        tokens.append(token)
                    else:
                        assert tokens[-1] == PLACEHOLDER_TOKEN_ID, seq
                        tokens[-1] = token
            written = item.start + item.num_new_tokens
            # (a preempted sequence holds no blocks; most steps fill no new block)
            if status is running and written // block_size > seq.num_hashed_blocks:
                first = seq.num_hashed_blocks * block_size
                assert PLACEHOLDER_TOKEN_ID not in tokens[first:written], seq
                bm.commit(seq, written)
            if not item.sample:
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            logprob = res.logprobs[0] if res.logprobs else None
            if len(res.token_ids) > 1:
                # n > 1, the first step: every choice's first token. Fork before the lead's stop
                # check, while it still holds the blocks the children share.
                batch = [SequenceUpdate(seq, token, logprob), *self._fork(seq, res, written, now)]
                for update in batch:
                    update.stop_token = self._check_stop(update.seq, update.token_id)
                updates += batch
            else:
                updates.append(SequenceUpdate(seq, token, logprob, self._check_stop(seq, token)))
        self.generation_tokens_total += len(updates)
        return updates

    def _fork(self, parent: Sequence, res: SampledTokens, written: int, now: float) -> list[SequenceUpdate]:
        """The n - 1 other choices share the lead's blocks. `written`: positions the step wrote
        (async: the lead's count already includes the next step's token; the children's not)."""
        children = []
        for k, token in enumerate(res.token_ids[1:], start=1):
            child = Sequence(parent.request_id, parent.prompt_token_ids, parent.sampling_params,
                             index=k, arrival_time=parent.arrival_time)
            child.token_ids = parent.token_ids[:-1] + [token]
            child.num_cached_tokens = parent.num_cached_tokens
            child.first_scheduled_time = parent.first_scheduled_time
            child.first_token_time = now
            child.pending_forks = 0
            if parent.status == SequenceStatus.RUNNING:
                self.block_manager.fork(parent, child)
                child.num_computed_tokens = written
                self.add_running(child)
            else:  # async: the parent was preempted before its first tokens arrived: recompute
                self.add(child)
            children.append(SequenceUpdate(child, token, res.logprobs[k] if res.logprobs else None, forked=True))
        return children

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        """Finish on a stop token id, EOS or a length limit; True when a stop token ended it.
        `token`: seq's last token. (Stop strings need text: the engine's output stage checks them.)"""
        params = seq.sampling_params
        num_tokens = len(seq.token_ids)
        num_out = num_tokens - seq.num_prompt_tokens
        if num_out >= params.min_tokens:
            if params.stop_token_ids and token in params.stop_token_ids:
                seq.stop_reason = token
                self.finish(seq, FinishReason.STOP)
                return True
            if not params.ignore_eos and token in self.eos_token_ids:
                self.finish(seq, FinishReason.STOP)
                return True
        max_tokens = params.max_tokens
        if (max_tokens is not None and num_out >= max_tokens) or num_tokens >= self.max_model_len:
            self.finish(seq, FinishReason.LENGTH)
        return False
