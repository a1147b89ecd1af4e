"""What the engine core hands out: per-step deltas, statistics, and the one accumulator.

The core emits, after every step, one `RequestDelta` per request that changed: each changed
choice's NEW token ids, their logprobs, the new text and, once, the finish reason. Nothing is
cumulative on the wire, so a step costs the same whether a request has produced 3 tokens or
3,000. `OutputAccumulator` is the only place deltas are merged: `AsyncEngine` uses `take()` to
hand a stream consumer everything since its last read (several steps merged only when the
consumer was slower than the engine), and `LLM.generate` uses `output()` for the whole result.

Every type here is a `msgspec.Struct` (array-like: field names never travel) because these
are exactly what crosses the engine-process boundary (`engine/core_process.py`); in-process
they are passed as they are.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "CompletionDelta",
    "CompletionOutput",
    "EngineStats",
    "OutputAccumulator",
    "RequestDelta",
    "RequestMetrics",
    "RequestOutput",
    "RequestSnapshot",
    "TokenLogprob",
]


class TokenLogprob(msgspec.Struct, array_like=True, gc=False):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first; len == SamplingParams.logprobs


class RequestMetrics(msgspec.Struct, array_like=True, gc=False):
    arrival_time: float  # time.monotonic() of the engine's process (the same clock in both)
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    num_preemptions: int = 0


class CompletionDelta(msgspec.Struct, array_like=True, gc=False):
    """One choice's change in one step (or several merged): only what is new."""

    index: int  # which of the request's n choices
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None  # one per new token when the request asked for them
    finish_reason: str | None = None  # "stop", "length", "abort"; set in the choice's last delta
    stop_reason: str | int | None = None  # the stop string or stop token id that matched


class RequestDelta(msgspec.Struct, array_like=True, gc=False):
    request_id: str
    outputs: list[CompletionDelta]  # the choices that changed, by index
    finished: bool  # every choice has finished: the request's last delta
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    metrics: RequestMetrics | None = None  # set in the last delta
    # [apps] SamplingParams.prompt_logprobs: one per prompt token (the first None), in the first delta
    prompt_logprobs: list[TokenLogprob | None] | None = None


class CompletionOutput(msgspec.Struct, gc=False):
    """One of a request's n choices, whole (what `LLM.generate` returns)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None


class RequestOutput(msgspec.Struct, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # [apps]


class RequestSnapshot(msgspec.Struct, array_like=True, gc=False):
    request_id: str
    phase: str  # "waiting", "prefill", "decode"
    num_prompt_tokens: int
    num_output_tokens: int
    arrival_time: float


class EngineStats(msgspec.Struct, array_like=True, gc=False):
    """A snapshot for /status, /metrics and the dashboard. Plain data, safe across threads and
    processes (it travels with every step's outputs from an engine process)."""

    num_running: int
    num_waiting: int
    num_kv_blocks_total: int
    num_kv_blocks_used: int  # referenced by a live sequence
    num_kv_blocks_cached: int  # free but holding a reusable prefix (evictable)
    kv_cache_usage: float  # used / total, 0..1
    prefix_cache_queries: int  # tokens looked up, cumulative
    prefix_cache_hits: int  # tokens found, cumulative
    num_preemptions: int  # cumulative
    prompt_tokens_total: int  # cumulative, prompt tokens computed (excludes prefix hits)
    generation_tokens_total: int  # cumulative
    num_steps: int  # cumulative engine steps
    last_step_time: float  # time.monotonic() of the last finished step (for stall detection)
    requests: list[RequestSnapshot] = msgspec.field(default_factory=list)
    kernel_compiles: int = 0  # Triton compiles after the warm-up (engine/compile_watch.py), cumulative
    gc_long_pauses: int = 0  # the engine process's collector pauses >= 50 ms (appliance/gc_watch.py), cumulative
    steps_by_path: dict[str, int] = msgspec.field(default_factory=dict)  # engine/model_runner.STEP_PATHS, cumulative

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class _Choice:
    """One choice's merged state: pieces since the last `take`, and (optionally) everything."""

    __slots__ = ("index", "pending", "token_ids", "texts", "logprobs", "finish_reason", "stop_reason",
                 "all_token_ids", "all_texts", "all_logprobs")

    def __init__(self, index: int, keep_all: bool) -> None:
        self.index = index
        self.pending = False  # added to since the last take
        self.token_ids: list[int] = []
        self.texts: list[str] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.all_token_ids: list[int] | None = [] if keep_all else None
        self.all_texts: list[str] | None = [] if keep_all else None
        self.all_logprobs: list[TokenLogprob] | None = None

    def add(self, delta: CompletionDelta) -> None:
        self.token_ids += delta.token_ids
        if delta.text:
            self.texts.append(delta.text)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
        if self.all_token_ids is not None and self.all_texts is not None:
            self.all_token_ids += delta.token_ids
            if delta.text:
                self.all_texts.append(delta.text)
            if delta.logprobs is not None:
                if self.all_logprobs is None:
                    self.all_logprobs = []
                self.all_logprobs += delta.logprobs


class OutputAccumulator:
    """Merges one request's deltas. NOTE: every operation costs O(what is new), never O(length).

    `take()`: everything added since the previous `take()`, as one RequestDelta (None when
    nothing is new). `output()`: the whole RequestOutput (only with keep_all=True).
    """

    __slots__ = ("request_id", "prompt_token_ids", "_choices", "_changed", "finished", "num_cached_tokens",
                 "metrics", "_keep_all", "prompt_logprobs", "_prompt_logprobs_sent")

    def __init__(self, request_id: str, prompt_token_ids: list[int] | None = None, *, keep_all: bool = False) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids or []
        self._choices: dict[int, _Choice] = {}
        self._changed: list[_Choice] = []
        self._keep_all = keep_all
        self.finished = False
        self.num_cached_tokens = 0
        self.metrics: RequestMetrics | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # [apps]
        self._prompt_logprobs_sent = False

    @property
    def has_news(self) -> bool:
        return bool(self._changed) or (self.finished and self.metrics is not None)

    def add(self, delta: RequestDelta) -> None:
        for out in delta.outputs:
            choice = self._choices.get(out.index)
            if choice is None:
                choice = self._choices[out.index] = _Choice(out.index, self._keep_all)
            if not choice.pending:
                choice.pending = True
                self._changed.append(choice)
            choice.add(out)
        self.num_cached_tokens = delta.num_cached_tokens
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finished:
            self.finished = True
            self.metrics = delta.metrics

    def abort(self, n: int) -> None:
        """Finish every choice of an n-choice request that has not finished as "abort" (the
        request was aborted from outside: the core reports nothing for it)."""
        for index in range(n):
            choice = self._choices.get(index)
            if choice is None or choice.finish_reason is None:
                self.add(RequestDelta(self.request_id, [CompletionDelta(index, [], "", None, "abort")], False))
        self.finished = True

    def take(self) -> RequestDelta | None:
        if not self._changed and not self.finished:
            return None
        outputs = []
        for choice in sorted(self._changed, key=lambda c: c.index) if len(self._changed) > 1 else self._changed:
            text = choice.texts[0] if len(choice.texts) == 1 else "".join(choice.texts)
            outputs.append(CompletionDelta(choice.index, choice.token_ids, text, choice.logprobs,
                                           choice.finish_reason, choice.stop_reason))
            choice.token_ids, choice.texts, choice.logprobs, choice.pending = [], [], None, False
        self._changed = []
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not self._prompt_logprobs_sent:
            prompt_logprobs, self._prompt_logprobs_sent = self.prompt_logprobs, True
        return RequestDelta(self.request_id, outputs, self.finished, self.num_cached_tokens,
                            self.metrics if self.finished else None, prompt_logprobs)

    def output(self) -> RequestOutput:
        assert self._keep_all, "OutputAccumulator(keep_all=True) keeps the whole output"
        outputs = [
            CompletionOutput(c.index, "".join(c.all_texts or ()), c.all_token_ids or [], c.finish_reason,
                             c.stop_reason, c.all_logprobs)
            for c in sorted(self._choices.values(), key=lambda c: c.index)
        ]
        return RequestOutput(self.request_id, self.prompt_token_ids, outputs, self.finished,
                             self.num_cached_tokens, self.metrics, self.prompt_logprobs)
