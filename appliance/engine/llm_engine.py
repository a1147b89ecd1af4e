"""The engine core (`EngineCore.step()` = schedule → execute → update) and the offline `LLM` API.

EngineCore is not thread-safe: exactly one thread drives it (the AsyncEngine thread in the
daemon, the caller's thread for `LLM`).

Async scheduling (`EngineConfig.async_scheduling`, the default): step() schedules and launches
step N, then waits for step N-1 and processes its results (stop checks, forks, outputs) while the
device runs step N. To schedule N before N-1's tokens are known, launching a step advances its
sequences at once: computed counts move on and every sampled row gets a placeholder token
(PLACEHOLDER_TOKEN_ID), which the device feeds to N and the results replace. So:
- step() returns the outputs of the step launched by the previous call;
- a sequence that finishes at N-1 may already be in step N: that result is dropped, and its
  blocks are freed once N is done (`_InFlight.free_after`);
- block hashes (prefix cache) are registered only from real token ids (`_commit` asserts it);
- a preempted sequence is re-admitted only after its placeholder is filled (the scheduler admits
  nothing in a step that preempts, and the step in flight is processed before the next schedule);
- n > 1 children are forked when the parent's first step is processed: one step later than sync;
- rows with penalties need every token id on the host: the step in flight is waited for first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from appliance.config import EngineConfig
from appliance.engine.block_manager import BlockManager
from appliance.engine.detokenizer import IncrementalDetokenizer
from appliance.engine.model_runner import ModelRunner, StepHandle, resolve_device_dtype
from appliance.engine.scheduler import Scheduler, SchedulerOutput
from appliance.engine.sequence import (
    PLACEHOLDER_TOKEN_ID,
    CompletionOutput,
    EngineStats,
    FinishReason,
    RequestMetrics,
    RequestOutput,
    RequestSnapshot,
    SamplingParams,
    Sequence,
    SequenceStatus,
    TokenLogprob,
)
from appliance.errors import InvalidRequestError, PromptTooLongError
from appliance.structured.grammar import StructuredOutputs

log = logging.getLogger(__name__)

CPU_MAX_MODEL_LEN = 8192


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float
    finished_time: float | None = None
    changed: bool = False
    eos_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


@dataclass
class _InFlight:
    """A launched step whose results the host has not processed yet."""

    out: SchedulerOutput
    handle: StepHandle
    seq_ids: set[int]  # every sequence in the step (async only)
    needs_host_ids: bool  # a sampling row has penalties: the next launch needs real token ids
    free_after: list[Sequence] = field(default_factory=list)  # finished meanwhile: free when done
    resolved: bool = False  # waited for; placeholders replaced


def _has_penalty(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


class EngineCore:
    """Owns the model runner, the scheduler and every request's sequences.

    Contract: `add_request` validates (raising typed errors, changing nothing on failure);
    `step` runs one batch and returns a RequestOutput for every request that changed;
    `abort` frees a request's blocks at any point. Outputs are cumulative.
    """

    def __init__(self, config: EngineConfig | None = None, *, stream_outputs: bool = True) -> None:
        """stream_outputs: report every request that changed on every step (servers stream them);
        False reports finished requests only and detokenizes once at the end unless a request
        has stop strings (offline use: far less host time per step)."""
        from appliance.models.loader import load_model, resolve_model
        from appliance.models.tokenizer import eos_token_ids, load_tokenizer

        self.config = config = config or EngineConfig()
        self.stream_outputs = stream_outputs
        t0 = time.monotonic()
        torch.manual_seed(config.model.seed)
        self.resolved = resolve_model(config.model)
        tokenizer_path = config.model.tokenizer or self.resolved.tokenizer_path
        # Named dummy architectures (benchmarks) have no tokenizer: token ids in, token ids out.
        self.tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
        self.model_name = config.model.served_model_name or self._default_name()
        self.device, self.dtype = resolve_device_dtype(config)
        model = load_model(config.model, self.device, self.dtype, resolved=self.resolved)
        self.eos_token_ids = (list(eos_token_ids(self.tokenizer, self.resolved.hf_config,
                                                 self.resolved.generation_config))
                              if self.tokenizer is not None else [])
        self.max_model_len = self._decide_max_model_len()
        self.runner = ModelRunner(config, model, self.device, self.dtype, self.eos_token_ids,
                                  self.max_model_len)
        # A sequence must fit in the cache on its own, or it could never run.
        self.max_model_len = min(self.max_model_len, self.runner.num_kv_blocks * config.cache.block_size)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        sched = config.scheduler
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=sched.max_num_seqs,
            max_num_batched_tokens=max(sched.max_num_batched_tokens, 1),
            max_model_len=self.max_model_len,
            enable_chunked_prefill=sched.enable_chunked_prefill,
        )
        self.detokenizer = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        # [apps] constrained decoding: grammars compile off this thread; the sampler applies the masks.
        self.structured = (StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_token_ids)
                           if self.tokenizer is not None else None)
        self.runner.sampler.grammar = self.structured
        self.requests: dict[str, _Request] = {}
        self.async_scheduling = config.async_scheduling
        self._in_flight: _InFlight | None = None  # async: the step the device may still be running
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._num_steps = 0
        self._last_step_time = time.monotonic()
        self.load_time_s = time.monotonic() - t0
        log.info("engine ready: %s on %s/%s, %d KV blocks of %d tokens, max_model_len %d (%.1f s)",
                 self.model_name, self.device, str(self.dtype).removeprefix("torch."),
                 self.runner.num_kv_blocks, config.cache.block_size, self.max_model_len, self.load_time_s)

    def _default_name(self) -> str:
        return self.resolved.name or Path(self.config.model.model.rstrip("/")).name

    def _decide_max_model_len(self) -> int:
        hf_len = getattr(self.resolved.hf_config, "max_position_embeddings", None) or 2048
        want = self.config.scheduler.max_model_len
        if want is not None:
            if want > hf_len:
                log.warning("max_model_len %d exceeds the model's %d", want, hf_len)
            return want
        return min(hf_len, CPU_MAX_MODEL_LEN) if self.device.type == "cpu" else hf_len

    @property
    def vocab_size(self) -> int:
        return int(self.runner.model.vocab_size)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        params.validate()
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if len(prompt_token_ids) + 1 > self.max_model_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(prompt_token_ids)} tokens, leaving no room for output.", param="messages",
                code="context_length_exceeded")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seq = Sequence(request_id, prompt_token_ids, params, index=0, arrival_time=arrival)
        self.requests[request_id] = _Request(request_id, list(prompt_token_ids), params, [seq], arrival)
        if params.structured is not None and self.structured is not None:
            self.structured.hold(seq)  # [apps] scheduled once its grammar is compiled (off this thread)
        else:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            self._finish(seq, FinishReason.ABORT)
        self._retire_if_dead()

    def has_unfinished_requests(self) -> bool:
        """True while a request runs or a launched step is not processed yet (keep stepping)."""
        return bool(self.requests) or self._in_flight is not None

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One step; returns outputs of the requests that changed.

        Sync: schedule → execute → update, and the outputs are this step's. Async: schedule and
        launch this step, then process the previous one while the device runs this one: the
        outputs are the previous step's (see the module docstring).
        """
        if self.structured is not None and self.structured.num_held:  # [apps] compiled grammars: schedulable
            for seq in self.structured.take_compiled()[0]:
                self.scheduler.add(seq)
        # [apps] the grammar advance: masks for this step need the constrained tokens of the step in
        # flight accepted, so that step is processed first (before schedule: what it finishes is gone).
        early_out: list[RequestOutput] = []
        in_flight = self._in_flight
        if in_flight is not None and any(r.seq.sampling_params.structured is not None for r in in_flight.handle.rows):
            self._in_flight = None
            self._process(in_flight)
            early_out = self._collect_outputs()
            self._retire_if_dead()
        out = self.scheduler.schedule()
        if out.is_empty and self._in_flight is None and self.structured is not None and self.structured.num_held:
            self.structured.wait_any(0.005)  # [apps] only compiles pending: nothing to launch
            return early_out
        now = time.monotonic()
        for item in out.scheduled:
            if item.seq.first_scheduled_time is None:
                item.seq.first_scheduled_time = now
        prev, self._in_flight = self._in_flight, None
        if prev is not None and prev.needs_host_ids:
            self._resolve(prev)  # penalties read every token id on the host
        launched = self._launch(out, prev)
        if self.async_scheduling:
            self._in_flight = launched
            if prev is not None:
                self._process(prev)
            # NOTE: outputs copy the token lists, so the placeholders appended next stay out.
            outputs = self._collect_outputs()
            self._advance(launched)
            self._retire_if_dead()
        else:
            self._advance(launched)
            self._process(launched)
            outputs = self._collect_outputs()
        self._num_steps += 1
        self._last_step_time = time.monotonic()
        return early_out + outputs

    def _launch(self, out: SchedulerOutput, prev: _InFlight | None) -> _InFlight:
        handle = self.runner.launch(out, prev.handle if prev is not None else None)
        if not self.async_scheduling:
            return _InFlight(out, handle, set(), False)
        return _InFlight(out, handle, {item.seq.seq_id for item in out.scheduled},
                         any(_has_penalty(row.seq.sampling_params) for row in handle.rows))

    def _advance(self, step: _InFlight) -> None:
        """Count the step's tokens as computed and give every sampling row a placeholder token."""
        for item in step.out.scheduled:
            seq = item.seq
            if seq.status != SequenceStatus.RUNNING:
                continue  # finished while the step was launched: its result is dropped
            old = seq.num_computed_tokens
            seq.num_computed_tokens = new = old + item.num_new_tokens
            if old < seq.num_prompt_tokens:
                self._prompt_tokens_total += min(new, seq.num_prompt_tokens) - old
            if item.sample:
                seq.token_ids.append(PLACEHOLDER_TOKEN_ID)
                seq.pending_forks = 0  # its first step draws the n samples; later ones draw one
                max_tokens = seq.sampling_params.max_tokens
                if (max_tokens is not None and seq.num_output_tokens >= max_tokens) or len(seq) >= self.max_model_len:
                    seq.finish_pending = True  # _check_stop will end it: schedule no wasted step

    def _resolve(self, step: _InFlight) -> None:
        """Wait for the step, free what finished meanwhile, put the real ids in place."""
        if step.resolved:
            return
        step.resolved = True
        results = step.handle.results()
        for seq in step.free_after:
            self.block_manager.free(seq)
        step.free_after.clear()
        for row in step.handle.rows:
            seq = row.seq
            if seq.status != SequenceStatus.FINISHED:
                assert seq.token_ids[-1] == PLACEHOLDER_TOKEN_ID, seq
                seq.token_ids[-1] = results[seq.seq_id].token_ids[0]

    def _retire_if_dead(self) -> None:
        """A step in flight whose sequences all finished: wait for it now and free their blocks,
        so an engine with no requests is idle (nothing in flight, every block free)."""
        step = self._in_flight
        if step is not None and all(item.seq.status == SequenceStatus.FINISHED for item in step.out.scheduled):
            self._resolve(step)
            self._in_flight = None

    def _process(self, step: _InFlight) -> None:
        """The host side of a finished step: hashes, sampled tokens, forks, stop checks."""
        self._resolve(step)
        results = step.handle.results()
        now = time.monotonic()
        block_size = self.block_manager.block_size
        for item in step.out.scheduled:
            seq = item.seq
            if seq.status == SequenceStatus.FINISHED:
                continue  # aborted, or finished by the step before
            # (a preempted sequence holds no blocks; most steps fill no new block)
            if seq.status == SequenceStatus.RUNNING and seq.num_computed_tokens // block_size > seq.num_hashed_blocks:
                self._commit(seq)
            if not item.sample:
                continue
            res = results[seq.seq_id]
            req = self.requests[seq.request_id]
            req.changed = self.stream_outputs
            if seq.first_token_time is None:
                seq.first_token_time = now
            if res.logprobs is not None:
                seq.logprobs.append(res.logprobs[0])
            if len(res.token_ids) == 1:
                self._generation_tokens_total += 1
                self._check_stop(seq)
                continue
            # n > 1, the first step: every choice's first token. Fork before the parent's stop
            # check, while it still holds the blocks the children share.
            children = self._fork(seq, res.token_ids[1:], res.logprobs[1:] if res.logprobs else None, now)
            for s in [seq, *children]:
                self._generation_tokens_total += 1
                self._check_stop(s)

    def _commit(self, seq: Sequence) -> None:
        """Register the hashes of newly full blocks; they must never cover a placeholder."""
        first = seq.num_hashed_blocks * self.block_manager.block_size
        assert PLACEHOLDER_TOKEN_ID not in seq.token_ids[first : seq.num_computed_tokens], seq
        self.block_manager.commit(seq)

    def _fork(self, parent: Sequence, tokens: list[int], logprobs: list[TokenLogprob] | None,
              now: float) -> list[Sequence]:
        if not tokens:
            return []
        req = self.requests[parent.request_id]
        children = []
        for k, token in enumerate(tokens, start=1):
            child = Sequence(parent.request_id, parent.prompt_token_ids, parent.sampling_params,
                             index=k, arrival_time=parent.arrival_time)
            child.token_ids = parent.token_ids[:-1] + [token]
            child.num_cached_tokens = parent.num_cached_tokens
            child.first_scheduled_time = parent.first_scheduled_time
            child.first_token_time = now
            if logprobs is not None:
                child.logprobs.append(logprobs[k - 1])
            if parent.status == SequenceStatus.RUNNING:
                self.block_manager.fork(parent, child)
                child.num_computed_tokens = parent.num_computed_tokens
                self.scheduler.add_running(child)
            else:  # async: the parent was preempted before its first tokens arrived: recompute
                self.scheduler.add(child)
            req.seqs.append(child)
            children.append(child)
        return children

    def _check_stop(self, seq: Sequence) -> None:
        params = seq.sampling_params
        if self.structured is not None:
            self.structured.accept(seq, seq.token_ids[-1])  # [apps] the grammar advance
        token = seq.token_ids[-1]
        num_out = seq.num_output_tokens
        reason: FinishReason | None = None
        stop_token = False
        # Stop tokens first: their text must not reach the output (vLLM semantics), so the
        # detokenizer never sees them through `update`.
        if num_out >= params.min_tokens:
            if token in params.stop_token_ids:
                reason, seq.stop_reason, stop_token = FinishReason.STOP, token, True
            elif token in self.eos_token_ids and not params.ignore_eos:
                reason, stop_token = FinishReason.STOP, True
        stop_str = None
        if reason is None and self.detokenizer is not None and (self.stream_outputs or params.stop):
            stop_str = self.detokenizer.update(seq)
            if stop_str is not None and num_out >= params.min_tokens:
                reason, seq.stop_reason = FinishReason.STOP, stop_str
        if reason is None:
            if params.max_tokens is not None and num_out >= params.max_tokens:
                reason = FinishReason.LENGTH
            elif len(seq) >= self.max_model_len:
                reason = FinishReason.LENGTH
        if reason is not None:
            if stop_str is None and self.detokenizer is not None:
                self.detokenizer.finalize(seq, drop_last_token=stop_token and not params.include_stop_str_in_output)
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status == SequenceStatus.FINISHED:
            return
        req = self.requests.get(seq.request_id)
        if req is not None:
            req.changed = True
        step = self._in_flight
        if step is not None and not step.resolved and seq.seq_id in step.seq_ids:
            # The device may still write its K/V: the blocks go back once that step is done.
            self.scheduler.finish(seq, reason, free_blocks=False)
            step.free_after.append(seq)
        else:
            self.scheduler.finish(seq, reason)
        self.runner.sampler.forget(seq.seq_id)

    def _collect_outputs(self) -> list[RequestOutput]:
        outputs = []
        done = []
        for req in self.requests.values():
            if not req.changed:
                continue
            req.changed = False
            finished = req.finished
            if finished:
                req.finished_time = time.monotonic()
                done.append(req.request_id)
            outputs.append(self._make_output(req, finished))
        for request_id in done:
            del self.requests[request_id]
        return outputs

    def _make_output(self, req: _Request, finished: bool) -> RequestOutput:
        seqs = sorted(req.seqs, key=lambda s: s.index)
        want_logprobs = req.params.logprobs is not None
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.output_text,
                token_ids=s.output_token_ids,
                finish_reason=s.finish_reason.value if s.finish_reason else None,
                stop_reason=s.stop_reason,
                logprobs=list(s.logprobs) if want_logprobs else None,
            )
            for s in seqs
        ]
        first = seqs[0]
        metrics = RequestMetrics(
            arrival_time=req.arrival_time,
            first_scheduled_time=first.first_scheduled_time,
            first_token_time=first.first_token_time,
            finished_time=req.finished_time,
            num_preemptions=sum(s.num_preemptions for s in seqs),
        )
        return RequestOutput(req.request_id, req.prompt_token_ids, outputs, finished,
                             num_cached_tokens=first.num_cached_tokens, metrics=metrics)

    # ------------------------------------------------------------------ observability
    def stats(self, include_requests: bool = False) -> EngineStats:
        usage = self.block_manager.usage()
        snapshots = []
        if include_requests:
            for req in self.requests.values():
                seq = req.seqs[0]
                if seq.status == SequenceStatus.RUNNING:
                    phase = "prefill" if seq.num_computed_tokens < seq.num_prompt_tokens else "decode"
                else:
                    phase = "waiting" if not seq.is_finished else "finished"
                snapshots.append(RequestSnapshot(req.request_id, phase, len(req.prompt_token_ids),
                                                 sum(s.num_output_tokens for s in req.seqs), req.arrival_time))
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_kv_blocks_total=usage.num_total,
            num_kv_blocks_used=usage.num_used,
            num_kv_blocks_cached=usage.num_cached_free,
            kv_cache_usage=usage.usage,
            prefix_cache_queries=usage.prefix_queries_tokens,
            prefix_cache_hits=usage.prefix_hits_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            num_steps=self._num_steps,
            last_step_time=self._last_step_time,
            requests=snapshots,
        )

    def warmup(self) -> None:
        """One short request end to end (the daemon says READY only after this)."""
        self.add_request("__warmup__", [self.eos_token_ids[0] if self.eos_token_ids else 0] * 4,
                         SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        while "__warmup__" in self.requests:
            self.step()
