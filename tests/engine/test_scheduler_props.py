"""Scheduler + block manager properties under random add / step / abort traffic (hypothesis).

The real Scheduler and BlockManager run, through the production update path (`schedule`,
`after_launch`, `update_from_output`: forks, stop checks and finishing are the scheduler's own),
synchronously or with async scheduling (the next step scheduled and launched before the previous
one's tokens are applied: placeholders fed "from the device", finished sequences' blocks kept
until the step in flight resolves); the model is simulated without torch. The simulated
forward writes each computed token id into a paged "KV cache" (one slot per position, addressed
through the block table) and then reads the whole prefix back through the table, so a block
that holds the wrong tokens (a bad prefix hit, a missed copy-on-write, a write into a shared or
cached block) is caught on the spot. The next token is a deterministic function of the prefix
read back, so every finished sequence must equal a cold, cache-free generation.

Tiny caches force preemption; every sequence still fits the cache alone, so all must finish.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from appliance.engine.block_manager import BlockManager, chain_hash
from appliance.engine.scheduler import Scheduler, SchedulerOutput
from appliance.engine.sequence import (
    PLACEHOLDER_TOKEN_ID,
    FinishReason,
    SamplingParams,
    Sequence,
    SequenceStatus,
)

VOCAB = 13
# Prompts are drawn from a few shared prefixes so prefix-cache hits are frequent.
BASES = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 12, 11, 10, 9, 8, 7], [5] * 10]


def next_token(prefix: list[int], choice: int = 0) -> int:
    """The simulated model: depends on every token of the prefix (and, for the first token of
    an n > 1 request, on the choice index)."""
    h = 7
    for tok in prefix:
        h = (h * 1_000_003 + tok + 1) % 2_147_483_647
    return (h + choice) % VOCAB


EOS = 0


def finished(
    num_output_tokens: int, length: int, last: int, params: SamplingParams, max_model_len: int
) -> bool:
    """EngineCore's stop rule, less stop strings: EOS (unless ignored), max_tokens, max_model_len."""
    if last == EOS and not params.ignore_eos:
        return True
    return num_output_tokens >= (params.max_tokens or 0) or length >= max_model_len


def cold_generation(prompt: list[int], choice: int, params: SamplingParams, max_model_len: int) -> list[int]:
    tokens = list(prompt) + [next_token(prompt, choice)]
    while not finished(len(tokens) - len(prompt), len(tokens), tokens[-1], params, max_model_len):
        tokens.append(next_token(tokens))
    return tokens


@dataclass
class Sampled:
    """What the sampler returns for a row (SampleResult's shape)."""

    token_ids: list[int]
    logprobs: None = None


class SimEngine:
    """EngineCore.step's loop around the real scheduler, with a fake model (see module doc)."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        budget: int,
        max_seqs: int,
        prefix_caching: bool,
        chunked_prefill: bool = True,
        async_scheduling: bool = False,
        prefill_cap: int = 0,
    ) -> None:
        self.block_size = block_size
        self.async_scheduling = async_scheduling
        # Async: the step launched last, with what its rows sampled ("still on the device").
        self.in_flight: tuple[SchedulerOutput, dict[int, Sampled]] | None = None
        self.max_model_len = num_blocks * block_size  # any single sequence fits the whole cache
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.sched = Scheduler(
            self.bm,
            max_num_seqs=max_seqs,
            max_num_batched_tokens=budget,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=chunked_prefill,
            eos_token_ids=[EOS],
            async_scheduling=async_scheduling,
            max_prefill_tokens_with_decodes=prefill_cap,
        )
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.requests: dict[str, list[Sequence]] = {}
        self.done: list[Sequence] = []  # finished by length (not aborted)
        self.aborted: list[Sequence] = []
        self.num_preempted = 0
        self.num_prefix_hit_tokens = 0

    # -- requests ---------------------------------------------------------------------------
    def add(
        self, request_id: str, prompt: list[int], max_tokens: int, n: int, ignore_eos: bool = True
    ) -> None:
        assert len(prompt) + 1 <= self.max_model_len  # EngineCore rejects longer prompts
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        seq = Sequence(request_id, prompt, params)
        self.requests[request_id] = [seq]
        self.sched.add(seq)

    def abort(self, request_id: str) -> None:
        for seq in self.requests.pop(request_id, []):
            if not seq.is_finished:
                self.sched.finish(seq, FinishReason.ABORT)
                self.aborted.append(seq)
            assert seq.block_table == [] or seq in self.deferred(), "blocks kept past the step in flight"

    def deferred(self) -> list[Sequence]:
        """Async: finished sequences whose blocks wait for a step in flight."""
        return self.sched.deferred_frees()

    def live(self) -> list[Sequence]:
        return [s for seqs in self.requests.values() for s in seqs if not s.is_finished]

    # -- one step ---------------------------------------------------------------------------
    def step(self, abort_midway: str | None = None) -> SchedulerOutput:
        """EngineCore.step's production path: schedule → (simulated) launch → update_from_output
        → after_launch (async: the update is the previous step's, as in EngineCore)."""
        waiting_before = list(self.sched.waiting)
        running_before = list(self.sched.running)
        # A row that would decode (one token to compute) before this schedule: the prompt-token cap applies.
        self.could_decode = any(not s.finish_pending and len(s.token_ids) - s.num_computed_tokens == 1
                                for s in running_before)
        hashed_before = {b.block_id for b in self.bm.blocks if b.block_hash is not None}
        take_fresh = self.bm._take_fresh
        taken: set[int] = set()  # handed out by this schedule (an evicted cached block included)

        def recording_take_fresh() -> int:
            block_id = take_fresh()
            taken.add(block_id)
            return block_id

        self.bm._take_fresh = recording_take_fresh  # type: ignore[method-assign]
        try:
            out = self.sched.schedule()
        finally:
            del self.bm._take_fresh
        self._check_schedule(out, waiting_before, running_before)

        for src, dst in out.blocks_to_copy:  # before the forward, as the model runner does
            self.kv[dst] = list(self.kv[src])
        on_device = self.in_flight[1] if self.in_flight is not None else {}
        sampled: dict[int, Sampled] = {}
        written: set[int] = set()
        for item in out.scheduled:  # every row's K/V first, then attention (as a layer does)
            seq, bs = item.seq, self.block_size
            start, end = item.start, item.start + item.num_new_tokens
            assert seq.num_computed_tokens == end, "schedule() counts the step as computed"
            assert 0 < item.num_new_tokens and end <= len(seq)
            assert item.sample == (end == len(seq))
            assert len(seq.block_table) * bs >= end, "block table too short for the step"
            for pos in range(start, end):  # write K/V of the new tokens
                block = self.bm.blocks[seq.block_table[pos // bs]]
                # A block hashed before this step is never written again; one hashed by this
                # step's schedule (a prompt block) may already be listed by prompts admitted after
                # it in the same step, which only read it, after this write.
                assert block.block_id not in hashed_before or block.block_id in taken, (
                    f"write into a cached (hashed) block {block}")
                assert block.ref_count == 1 or block.block_hash is not None, f"write into shared block {block}"
                assert (block.block_id, pos % bs) not in written, f"two writes of one slot in a step {block}"
                written.add((block.block_id, pos % bs))
                token = seq.token_ids[pos]
                if token == PLACEHOLDER_TOKEN_ID:  # fed from the step in flight, as on the GPU
                    assert pos == end - 1 == len(seq) - 1, "only a decode feeds a placeholder"
                    token = on_device[seq.seq_id].token_ids[0]
                self.kv[block.block_id][pos % bs] = token
        for item in out.scheduled:
            seq, bs = item.seq, self.block_size
            end = item.start + item.num_new_tokens
            # Attention reads the whole prefix back through the block table.
            seen = [self.kv[seq.block_table[p // bs]][p % bs] for p in range(end)]
            real = [t for t in seq.token_ids[:end] if t != PLACEHOLDER_TOKEN_ID]
            assert seen[: len(real)] == real, f"{seq}: KV cache holds {seen}, tokens {seq.token_ids[:end]}"
            if item.sample:  # the lead of an n > 1 request draws every choice's first token
                sampled[seq.seq_id] = Sampled([next_token(seen, k) for k in range(1 + seq.pending_forks)])

        if abort_midway is not None:  # a client disconnect while the forward runs
            self.abort(abort_midway)
        if self.async_scheduling:
            prev, self.in_flight = self.in_flight, (out, sampled)
            updates = self.sched.update_from_output(*prev) if prev is not None else []
            self.sched.after_launch(out)  # after the update, as EngineCore does
            if all(item.seq.is_finished for item in out.scheduled):  # EngineCore._retire_if_dead
                self.sched.resolve(out, sampled)
                self.in_flight = None
        else:
            self.sched.after_launch(out)
            updates = self.sched.update_from_output(out, sampled)
        for update in updates:
            seq = update.seq
            if update.forked:
                self.requests[seq.request_id].append(seq)
            elif seq.num_output_tokens == 1 and seq.num_cached_tokens:
                self.num_prefix_hit_tokens += seq.num_cached_tokens
            if seq.is_finished:
                assert seq.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
                assert update.stop_token == (seq.finish_reason == FinishReason.STOP)
                self.done.append(seq)
        for request_id in [r for r, seqs in self.requests.items() if all(s.is_finished for s in seqs)
                           and len(seqs) == seqs[0].sampling_params.n]:
            del self.requests[request_id]
        self.num_preempted += len(out.preempted)
        return out

    def busy(self) -> bool:
        return self.sched.has_unfinished() or self.in_flight is not None

    def _check_schedule(
        self, out: SchedulerOutput, waiting_before: list[Sequence], running_before: list[Sequence]
    ) -> None:
        assert out.num_batched_tokens == sum(i.num_new_tokens for i in out.scheduled)
        assert out.num_batched_tokens <= self.sched.max_num_batched_tokens
        cap = self.sched.max_prefill_tokens_with_decodes
        if cap and self.sched.enable_chunked_prefill and self.could_decode:
            # A step that could decode takes at most `cap` tokens of prompt chunks (rows of more
            # than one token; admissions count whole).
            admitted = [i for i in out.scheduled if i.seq in waiting_before]
            chunks = [i for i in out.scheduled if i.num_new_tokens > 1 and i.seq not in waiting_before]
            assert sum(i.num_new_tokens for i in chunks + admitted) <= cap
        assert len({id(i.seq) for i in out.scheduled}) == len(out.scheduled)
        # Preemption takes the newest running sequences first.
        assert out.preempted == list(reversed(running_before))[: len(out.preempted)]
        # FCFS: the sequences admitted from the waiting queue are a prefix of it, in order.
        admitted = [i.seq for i in out.scheduled if i.seq in waiting_before]
        assert admitted == waiting_before[: len(admitted)]
        if admitted:
            # (async: a sequence whose last token is in flight leaves on its update; it counts not)
            assert len([s for s in self.sched.running if not s.finish_pending]) <= self.sched.max_num_seqs
            assert not out.preempted  # nothing is admitted in a step that had to preempt

    # -- invariants -------------------------------------------------------------------------
    def check(self) -> None:
        bm, bs = self.bm, self.block_size
        live = self.live()
        deferred = self.deferred()
        bm.check_invariants([s.block_table for s in live + deferred])  # refcounts == table membership
        usage = bm.usage()
        assert usage.num_used + usage.num_cached_free + usage.num_free == usage.num_total
        assert usage.num_used == len({b for s in live + deferred for b in s.block_table})
        running, waiting = self.sched.running, list(self.sched.waiting)
        assert len(set(map(id, running))) == len(running) and not set(map(id, running)) & set(
            map(id, waiting)
        )
        assert {id(s) for s in live} == {id(s) for s in running} | {id(s) for s in waiting}
        for seq in waiting:
            assert seq.block_table == [] and seq.num_computed_tokens == 0
            assert seq.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED)
        for seq in running:
            assert seq.status == SequenceStatus.RUNNING
            assert 0 < seq.num_uncomputed_tokens and len(seq.block_table) * bs >= seq.num_computed_tokens
            seen = [self.kv[seq.block_table[p // bs]][p % bs] for p in range(seq.num_computed_tokens)]
            assert seen == seq.token_ids[: seq.num_computed_tokens]
            # A hashed block in a table holds exactly that sequence's prefix (chained hash).
            parent = None
            for i, block_id in enumerate(seq.block_table):
                block = bm.blocks[block_id]
                if block.block_hash is None:
                    break
                chunk = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                assert block.token_ids == chunk
                parent = chain_hash(parent, chunk)
                assert block.block_hash == parent
        for block in bm.blocks:  # cached content is never overwritten while its hash is live
            if block.block_hash is not None:
                assert tuple(self.kv[block.block_id]) == block.token_ids
        for seq in self.done:
            assert seq.block_table == [] or seq in deferred
        if not self.busy():
            assert usage.num_used == 0 and not self.requests

    def drain(self, max_steps: int = 5000) -> None:
        """Every sequence finishes (each fits the cache alone), then nothing is held."""
        for _ in range(max_steps):
            if not self.busy():
                break
            in_flight = self.in_flight
            out = self.step()
            assert not out.is_empty or in_flight is not None, (
                f"no progress: running={self.sched.running} waiting={self.sched.waiting}")
            self.check()
        assert not self.busy(), "sequences never finished"
        usage = self.bm.usage()
        assert usage.num_used == 0 and usage.num_free + usage.num_cached_free == usage.num_total
        assert all(b.ref_count == 0 for b in self.bm.blocks)
        for seq in self.done:
            params = seq.sampling_params
            want = cold_generation(seq.prompt_token_ids, seq.index, params, self.max_model_len)
            assert seq.token_ids == want, f"{seq} differs from a cold run"


class SchedulerMachine(RuleBasedStateMachine):
    engine: SimEngine

    def __init__(self) -> None:
        super().__init__()
        self.next_id = 0

    @initialize(
        num_blocks=st.integers(2, 10),
        block_size=st.sampled_from([1, 2, 3, 4]),
        budget=st.integers(1, 20),
        max_seqs=st.integers(1, 4),
        prefix_caching=st.booleans(),
        chunked_prefill=st.booleans(),
        async_scheduling=st.booleans(),
        prefill_cap=st.sampled_from([0, 0, 1, 2, 3, 5]),
    )
    def setup(
        self,
        num_blocks: int,
        block_size: int,
        budget: int,
        max_seqs: int,
        prefix_caching: bool,
        chunked_prefill: bool,
        async_scheduling: bool,
        prefill_cap: int,
    ) -> None:
        self.engine = SimEngine(num_blocks, block_size, budget, max_seqs, prefix_caching, chunked_prefill,
                                async_scheduling, prefill_cap)

    @rule(
        base=st.integers(0, len(BASES) - 1),
        cut=st.integers(0, 10),
        extra=st.lists(st.integers(0, VOCAB - 1), max_size=4),
        max_tokens=st.integers(1, 8),
        n=st.sampled_from([1, 1, 1, 2, 3]),
        ignore_eos=st.booleans(),
    )
    def add(self, base: int, cut: int, extra: list[int], max_tokens: int, n: int, ignore_eos: bool) -> None:
        prompt = (BASES[base][:cut] + extra)[: self.engine.max_model_len - 1] or [1]
        self.engine.add(f"r{self.next_id}", prompt, max_tokens, n, ignore_eos)
        self.next_id += 1

    @rule()
    def step(self) -> None:
        self.engine.step()

    @rule()
    def step_twice(self) -> None:
        self.engine.step()
        self.engine.step()

    @precondition(lambda self: bool(self.engine.requests))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        self.engine.abort(data.draw(st.sampled_from(sorted(self.engine.requests))))

    @precondition(lambda self: bool(self.engine.requests))
    @rule(data=st.data())
    def abort_during_step(self, data: st.DataObject) -> None:
        self.engine.step(abort_midway=data.draw(st.sampled_from(sorted(self.engine.requests))))

    @rule()
    def abort_unknown(self) -> None:
        self.engine.abort("no-such-request")

    @invariant()
    def invariants(self) -> None:
        self.engine.check()

    def teardown(self) -> None:
        if hasattr(self, "engine"):
            self.engine.drain()


TestSchedulerProperties = SchedulerMachine.TestCase
TestSchedulerProperties.settings = settings(
    max_examples=120, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_tiny_cache_preempts_and_still_matches_cold_runs(async_scheduling: bool) -> None:
    """A fixed heavy workload: preemption must happen, prefix hits must happen, outputs stay exact."""
    rng = random.Random(0)
    engine = SimEngine(num_blocks=6, block_size=2, budget=8, max_seqs=4, prefix_caching=True,
                       async_scheduling=async_scheduling)
    for i in range(40):
        base = BASES[rng.randrange(len(BASES))]
        prompt = base[: rng.randint(2, 7)] + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 2))]
        engine.add(f"r{i}", prompt, rng.randint(1, 4), rng.choice([1, 1, 2]))
        engine.step()
        engine.check()
        if rng.random() < 0.1 and engine.requests:
            engine.abort(rng.choice(sorted(engine.requests)))
            engine.check()
    engine.drain()
    assert engine.num_preempted > 0
    assert engine.num_prefix_hit_tokens > 0
    assert len(engine.done) > 30
