"""The engine core: `EngineCore.step()` = schedule → launch → update, emitting per-step deltas.

EngineCore is not thread-safe: exactly one thread drives it (the engine process's main thread,
the in-process client's engine thread, or the caller's thread for `LLM`).

A step: `Scheduler.schedule()` picks the batch and counts its tokens as computed;
`ModelRunner.launch` enqueues the forward and the sampling; `Scheduler.update_from_output`
applies the sampled tokens (hashes, forks, stop tokens, lengths, finishing); the output stage
here detokenizes, checks stop strings and builds one `RequestDelta` per changed request.

Async scheduling (`EngineConfig.async_scheduling`, the default): step() schedules and launches
step N, then waits for step N-1 and updates from its results while the device runs step N, then
gives N's sampling rows placeholders (`Scheduler.after_launch`). So:
- step() returns the deltas of the step launched by the previous call;
- a sequence that finishes at N-1 may already be in step N: that result is dropped, and its
  blocks are freed once N is done (the scheduler defers the free);
- block hashes (prefix cache) are registered only from real token ids (the scheduler asserts it);
- a preempted sequence is re-admitted only after its placeholder is filled (the scheduler admits
  nothing in a step that preempts, and the step in flight is updated before the next schedule);
- n > 1 children are forked when the parent's first step is updated: one step later than sync;
- rows with penalties need every token id on the host: the step in flight is waited for first.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from appliance import gc_watch
from appliance.config import EngineConfig
from appliance.engine import compile_watch
from appliance.engine.block_manager import BlockManager, kv_free_window
from appliance.engine.detokenizer import IncrementalDetokenizer
from appliance.engine.model_runner import ModelRunner, StepHandle, resolve_device_dtype
from appliance.engine.outputs import (
    CompletionDelta,
    EngineStats,
    RequestDelta,
    RequestMetrics,
    RequestSnapshot,
)
from appliance.engine.scheduler import Scheduler, SchedulerOutput, SequenceUpdate
from appliance.engine.sequence import (
    FinishReason,
    SamplingParams,
    Sequence,
    SequenceStatus,
    validate_request,
)
from appliance.errors import InvalidRequestError
from appliance.structured.grammar import StructuredOutputs

log = logging.getLogger(__name__)

CPU_MAX_MODEL_LEN = 8192
_GRAMMAR_WAIT_S = 0.005  # [apps] an idle engine's wait for a compile (new commands are read between waits)


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float

    @property
    def finished(self) -> bool:
        if len(self.seqs) != self.params.n:
            return False
        for seq in self.seqs:
            if seq.status is not SequenceStatus.FINISHED:
                return False
        return True


@dataclass
class _InFlight:
    """A launched step whose results the host has not applied yet."""

    out: SchedulerOutput
    handle: StepHandle
    needs_host_ids: bool = False  # a sampling row has penalties: the next launch needs real token ids


def _tokens_need_output(params: SamplingParams) -> bool:
    """Final-only outputs: a token of such a request needs the output stage before its choice
    finishes (n > 1 forks, stop strings, logprobs, a grammar)."""
    return params.n > 1 or bool(params.stop) or params.logprobs is not None or params.structured is not None


def _has_penalty(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


class EngineCore:
    """Owns the model runner, the scheduler and every request's sequences.

    Contract: `add_request` validates (raising typed errors, changing nothing on failure);
    `step` runs one batch and returns a `RequestDelta` for every request that changed (only
    what is new); `abort` frees a request's blocks at any point and reports nothing.
    """

    def __init__(self, config: EngineConfig | None = None, *, stream_outputs: bool = True) -> None:
        """stream_outputs: report every request that changed on every step (servers stream them);
        False reports each choice once, whole, when it finishes, and detokenizes once at the end
        unless a request has stop strings (offline use: far less host time per step)."""
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
        # Blocks that fell out of every layer's sliding window go back to the pool (none when a
        # layer attends globally).
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching,
                                          sliding_window=kv_free_window(getattr(model, "sliding_windows", [None])))
        sched = config.scheduler
        self.async_scheduling = config.async_scheduling
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=sched.max_num_seqs,
            max_num_batched_tokens=max(sched.max_num_batched_tokens, 1),
            max_model_len=self.max_model_len,
            enable_chunked_prefill=sched.enable_chunked_prefill,
            eos_token_ids=self.eos_token_ids,
            async_scheduling=self.async_scheduling,
            common_prefix_min_seqs=self.runner.cascade_min_seqs,  # 0: cascade attention off
            max_prefill_tokens_with_decodes=sched.max_prefill_tokens_with_decodes,
        )
        self.detokenizer = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        # [apps] constrained decoding: grammars compile off this thread; the sampler applies the masks.
        self.structured = (StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_token_ids)
                           if self.tokenizer is not None else None)
        self.runner.sampler.grammar = self.structured
        self.requests: dict[str, _Request] = {}
        # Live requests with a grammar / with penalties: a step looks through its rows for them
        # only when there are some (most steps: none, and the scan grows with the batch).
        self._num_constrained = 0
        self._num_penalized = 0
        self._num_token_output = 0  # see _tokens_need_output
        self._in_flight: _InFlight | None = None  # async: the step the device may still be running
        self._num_steps = 0
        self._last_step_time = time.monotonic()
        # NOTE: what exists now (modules, the tokenizer, the model's and graphs' Python objects) lives
        # as long as the engine: it leaves the cyclic GC's view, so a full collection (which serving
        # and a burst of requests still trigger now and then) walks only what came after: a few ms,
        # not a pause over the whole heap in the middle of a step. Garbage is collected first, or it
        # would be frozen with the rest.
        gc.collect()
        gc.freeze()
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
        validate_request(prompt_token_ids, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        if params.structured is not None and self.structured is None:  # [apps]
            raise InvalidRequestError("constrained decoding needs the model's tokenizer; this model has none",
                                      param="response_format")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seq = Sequence(request_id, prompt_token_ids, params, index=0, arrival_time=arrival)
        self.requests[request_id] = _Request(request_id, list(prompt_token_ids), params, [seq], arrival)
        self._count_request(params, 1)
        if params.structured is not None and self.structured is not None:
            self.structured.hold(seq)  # [apps] scheduled once its grammar is compiled (off this thread)
        else:
            self.scheduler.add(seq)

    def _count_request(self, params: SamplingParams, sign: int) -> None:
        self._num_constrained += sign * (params.structured is not None)
        self._num_penalized += sign * _has_penalty(params)
        self._num_token_output += sign * _tokens_need_output(params)

    def _pop_request(self, request_id: str) -> _Request | None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self._count_request(req.params, -1)
        return req

    def abort(self, request_id: str) -> None:
        req = self._pop_request(request_id)
        if req is None:
            return
        for seq in req.seqs:
            self._finish(seq, FinishReason.ABORT)
        self._retire_if_dead()

    def has_unfinished_requests(self) -> bool:
        """True while a request runs or a launched step is not applied yet (keep stepping)."""
        return bool(self.requests) or self._in_flight is not None

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestDelta]:
        """One step: schedule → launch → update. Returns a delta for every request that changed.

        Sync: the deltas are this step's. Async: this step is launched, then the previous one is
        applied while the device runs this one: the deltas are the previous step's.
        """
        sched = self.scheduler
        failed = self._admit_compiled() if self.structured is not None and self.structured.num_held else []
        out = sched.schedule()
        prev, self._in_flight = self._in_flight, None
        if out.is_empty and prev is None and self.structured is not None and self.structured.num_held:
            self.structured.wait_any(_GRAMMAR_WAIT_S)  # [apps] only compiles pending: nothing to launch
            return failed
        # [apps] the grammar advance: constrained rows' masks need the step in flight's tokens
        # accepted (in its update), so their sampling is enqueued after that update; the forward
        # still overlaps the host work.
        has_grammar = self._num_constrained > 0 and any(
            item.sample and item.seq.sampling_params.structured is not None for item in out.scheduled)
        defer = self.async_scheduling and has_grammar and prev is not None
        if prev is not None and prev.needs_host_ids:
            sched.resolve(prev.out, prev.handle.results())  # penalties read every token id on the host
        handle = self.runner.launch(out, prev.handle if prev is not None else None, defer_sampling=defer)
        if self.async_scheduling:
            self._in_flight = _InFlight(out, handle, self._num_penalized > 0 and any(
                _has_penalty(row.seq.sampling_params) for row in handle.rows))
            deltas = self._update(prev) if prev is not None else []
            if defer:
                self.runner.sample_deferred(handle)  # [apps] prev's tokens are accepted now
            sched.after_launch(out)  # NOTE: after the update: its placeholders stay out of it
            self._retire_if_dead()
        else:
            sched.after_launch(out)
            deltas = self._update(_InFlight(out, handle))
        self._num_steps += 1
        self._last_step_time = time.monotonic()
        return failed + deltas if failed else deltas

    def _warmup_eager_steps(self, token: int) -> None:
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        long_len = self.config.cuda_graph_prefill_max_tokens + self.config.cache.block_size + 1
        budget = self.config.scheduler.max_num_batched_tokens
        if long_len + params.max_tokens <= self.max_model_len and long_len <= budget:
            # A lone prefill past the prefill graphs (piecewise, or eager with those off).
            self.add_request("__warmup_long__", [token] * long_len, params)
            while "__warmup_long__" in self.requests:
                self.step()
        # Two prompts at once (a multi-sequence prefill), then a third one while they decode (a
        # mixed step: decode rows and a prefill). Odd lengths (no multiple of the block size), and
        # prompts that share no block with each other or the ones above (prefix-cache hits
        # would shrink their prefills to one token).
        if self.max_model_len < 33 + params.max_tokens:
            return
        vocab = self.vocab_size

        def prompt(first: int, length: int) -> list[int]:
            return [(first + 7 * i) % vocab for i in range(length)]

        self.add_request("__warmup_a__", prompt(1, 33), params)
        self.add_request("__warmup_b__", prompt(2, 17), params)
        self.step()
        self.add_request("__warmup_c__", prompt(3, 9), params)
        while any(rid in self.requests for rid in ("__warmup_a__", "__warmup_b__", "__warmup_c__")):
            self.step()

    def _admit_compiled(self) -> list[RequestDelta]:
        """[apps] Constrained sequences whose grammar compiled go to the scheduler; a failed compile
        (the front end checks grammars, so an internal error) ends its request as 'abort'."""
        assert self.structured is not None
        ready, failed = self.structured.take_compiled()
        for seq in ready:
            self.scheduler.add(seq)
        deltas = []
        for seq, error in failed:
            log.error("grammar compile failed for %s: %s", seq.request_id, error)
            req = self._pop_request(seq.request_id)
            if req is None:
                continue
            for s in req.seqs:
                self._finish(s, FinishReason.ABORT)
            deltas.append(RequestDelta(req.request_id, [CompletionDelta(s.index, [], "", None, "abort", None)
                                                        for s in req.seqs], True, 0, self._metrics(req)))
        return deltas

    def _retire_if_dead(self) -> None:
        """A step in flight whose sequences all finished: wait for it now and free their blocks,
        so an engine with no requests is idle (nothing in flight, every block free)."""
        step = self._in_flight
        if step is not None and all(item.seq.status == SequenceStatus.FINISHED for item in step.out.scheduled):
            self.scheduler.resolve(step.out, step.handle.results())
            self._in_flight = None

    def _update(self, step: _InFlight) -> list[RequestDelta]:
        """The scheduler applies the step; then the output stage: text, stop strings, deltas."""
        updates = self.scheduler.update_from_output(step.out, step.handle.results())
        changed: dict[str, list[CompletionDelta]] = {}
        stream = self.stream_outputs
        structured = self.structured if self._num_constrained else None
        detok = self.detokenizer
        forget = self.runner.sampler.forget
        finished_status = SequenceStatus.FINISHED
        # NOTE: this loop runs for every token of every sequence: final-only (offline) requests
        # without stop strings skip the text until they finish, and when no live request needs
        # its tokens before the end (_tokens_need_output), only finished sequences are looked at.
        if not stream and not self._num_token_output:
            updates = [update for update in updates if update.seq.status is finished_status]
        for update in updates:
            seq = update.seq
            params = seq.sampling_params
            if update.forked:
                self.requests[seq.request_id].seqs.append(seq)
            if structured is not None and params.structured is not None:
                structured.accept(seq, update.token_id)  # [apps] the grammar advance
            finished = seq.status is finished_status
            if detok is not None and (stream or finished or params.stop):
                self._text(seq, update)
                finished = seq.status is finished_status
            if finished:
                forget(seq.seq_id)
            if stream:
                text = seq.output_text[seq.num_text_sent:]
                seq.num_text_sent = len(seq.output_text)
                delta = CompletionDelta(seq.index, [update.token_id], text,
                                        None if params.logprobs is None else [update.logprob],  # type: ignore[list-item]
                                        seq.finish_reason.value if finished else None,  # type: ignore[union-attr]
                                        seq.stop_reason if finished else None)
            else:
                if params.logprobs is not None:
                    seq.logprobs.append(update.logprob)  # type: ignore[arg-type]
                if not finished:
                    continue
                delta = CompletionDelta(seq.index, seq.output_token_ids, seq.output_text,
                                        seq.logprobs if params.logprobs is not None else None,
                                        seq.finish_reason.value, seq.stop_reason)  # type: ignore[union-attr]
            changed.setdefault(seq.request_id, []).append(delta)
        deltas = []
        for request_id, outputs in changed.items():
            req = self.requests[request_id]
            finished = req.finished
            metrics = None
            if finished:
                self._pop_request(request_id)
                metrics = self._metrics(req)
            if len(outputs) > 1:
                outputs.sort(key=lambda d: d.index)
            first = req.seqs[0]
            prompt_logprobs, first.prompt_logprobs = first.prompt_logprobs, None  # [apps] sent once
            deltas.append(RequestDelta(request_id, outputs, finished, first.num_cached_tokens, metrics,
                                       prompt_logprobs))
        return deltas

    def _text(self, seq: Sequence, update: SequenceUpdate) -> None:
        """Detokenize the new token; a stop string ends the sequence (as STOP, over a length
        finish of the same token). NOTE: a stop token's text never reaches the detokenizer."""
        detok = self.detokenizer
        if detok is None:
            return
        params = seq.sampling_params
        stop_str = None
        if not update.stop_token and (self.stream_outputs or params.stop):
            stop_str = detok.update(seq)
            if stop_str is not None and seq.num_output_tokens >= params.min_tokens:
                if seq.is_finished:
                    seq.finish_reason = FinishReason.STOP
                else:
                    self._finish(seq, FinishReason.STOP)
                seq.stop_reason = stop_str
                return
        if seq.is_finished:
            detok.finalize(seq, drop_last_token=update.stop_token and not params.include_stop_str_in_output)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status == SequenceStatus.FINISHED:
            return
        self.scheduler.finish(seq, reason)
        self.runner.sampler.forget(seq.seq_id)

    @staticmethod
    def _metrics(req: _Request) -> RequestMetrics:
        first = min(req.seqs, key=lambda s: s.index)
        return RequestMetrics(
            arrival_time=req.arrival_time,
            first_scheduled_time=first.first_scheduled_time,
            first_token_time=first.first_token_time,
            finished_time=time.monotonic(),
            num_preemptions=sum(s.num_preemptions for s in req.seqs),
        )

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
        sched = self.scheduler
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            num_kv_blocks_total=usage.num_total,
            num_kv_blocks_used=usage.num_used,
            num_kv_blocks_cached=usage.num_cached_free,
            kv_cache_usage=usage.usage,
            prefix_cache_queries=usage.prefix_queries_tokens,
            prefix_cache_hits=usage.prefix_hits_tokens,
            num_preemptions=sched.num_preemptions,
            prompt_tokens_total=sched.prompt_tokens_total,
            generation_tokens_total=sched.generation_tokens_total,
            num_steps=self._num_steps,
            last_step_time=self._last_step_time,
            requests=snapshots,
            kernel_compiles=compile_watch.compiles_so_far(),
            gc_long_pauses=gc_watch.long_pauses_so_far(),
            steps_by_path=dict(self.runner.step_paths),
        )

    def warmup(self) -> None:
        """One short request end to end (the daemon says READY only after this).

        On CUDA also the steps no CUDA graph serves, so that their Triton kernels compile here and
        not in a user's request (a compile is 0.2-2 s of a step, and every request in it waits):
        a lone prompt longer than the largest prefill graph (eager), a step that prefills several
        prompts, and a step that mixes decodes with a prefill.
        """
        token = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.add_request("__warmup__", [token] * 4, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        while "__warmup__" in self.requests:
            self.step()
        if self.device.type == "cuda":
            self._warmup_eager_steps(token)
            compile_watch.watch_compiles()  # from now on a Triton compile is a step that waits: logged
