"""The engine side of constrained decoding: compile (off the loop, cached), match, mask.

Lives in the engine core's process (in-process or the engine child): `EngineCore` owns one
`StructuredOutputs`, registers every constrained sequence with it, asks `ready()` before letting
the scheduler see the sequence, calls `accept()` with each sampled token in its update path, and
hands it to the sampler as `grammar`, which calls `bitmask()` right before sampling a step and
applies the result to the logits on the device (`apply_token_bitmask`).

Why xgrammar (bench/results/grammar_backends_cpu.json, SmolLM2 tokenizer, 2 host cores): a
typical 10-field schema compiles cold in ~8 ms (llguidance ~5 ms) but a cached compile costs
~5 µs (llguidance has no compiled-grammar cache: ~1 ms per new matcher); filling the bitmask of
64 rows costs 0.33 ms median / 3.6 ms p99 against 1.3 / 32 ms. The per-step cost is what a
batch of 64 pays on every token, so xgrammar.

NOTE: not thread-safe except `GrammarCompiler.submit` (the pool's threads only compile). One
engine thread calls everything else.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from appliance.structured.spec import GrammarSpec, choice_regex

if TYPE_CHECKING:
    from appliance.engine.sampler import SampleRow
    from appliance.engine.sequence import Sequence

log = logging.getLogger(__name__)

_CACHE_ENTRIES = 512  # compiled grammars kept (a typical schema's is tens of KiB)
_COMPILE_THREADS = 1  # one: the host has few cores and the engine thread needs one


class GrammarCompiler:
    """Spec -> Future[xgrammar.CompiledGrammar], compiled on a thread pool, LRU-cached by spec.

    The tokenizer's vocabulary table (TokenizerInfo, ~0.4 s for a 49k vocabulary) is built by
    the first compile, on the pool, so the engine never waits for it.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._compiler: Any = None  # xgrammar.GrammarCompiler, built on the pool
        self._pool = concurrent.futures.ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="grammar")
        self._cache: OrderedDict[GrammarSpec, concurrent.futures.Future[Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiles = 0
        self.num_cache_hits = 0

    def submit(self, spec: GrammarSpec) -> concurrent.futures.Future[Any]:
        with self._lock:
            future = self._cache.get(spec)
            if future is not None and not (future.done() and future.exception() is not None):
                self._cache.move_to_end(spec)
                self.num_cache_hits += 1
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[spec] = future
            self.num_compiles += 1
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
            return future

    def compile_now(self, spec: GrammarSpec) -> Any:
        """Compile on the caller's thread, through the cache (benchmarks, tests)."""
        return self.submit(spec).result()

    def _xgr_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._eos_token_ids or None)
            self._compiler = xgr.GrammarCompiler(info, max_threads=_COMPILE_THREADS, cache_enabled=True)
        return self._compiler

    def _compile(self, spec: GrammarSpec) -> Any:
        compiler = self._xgr_compiler()
        if spec.kind == "json_schema":
            # Compact JSON (no free whitespace): a small model cannot wander off into newlines.
            return compiler.compile_json_schema(spec.source, any_whitespace=False, strict_mode=True)
        if spec.kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.source)
        if spec.kind == "choice":
            return compiler.compile_regex(choice_regex(json.loads(spec.source)))
        if spec.kind == "grammar":
            return compiler.compile_grammar(spec.source)
        raise AssertionError(spec.kind)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class StructuredOutputs:
    """Per-sequence grammar state of one engine core (see the module docstring for the calls).

    A sequence is constrained when `seq.sampling_params.structured` is set; its matcher is made
    on first use from the compiled grammar (so an n > 1 child gets its own, from the start
    state, and accepts its first token like any other).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)
        self._matchers: dict[int, Any] = {}  # seq_id -> xgrammar.GrammarMatcher
        self._held: list[tuple[Sequence, concurrent.futures.Future[Any]]] = []  # compiling
        # Mask fill of a step's rows: 0 = one after another on the engine thread; N > 0 = xgrammar's
        # BatchGrammarMatcher on N threads (worth it on a many-core GPU host with large batches;
        # slower on 2 cores: bench/results/grammar_backends_cpu.json). bench/structured.py measures both.
        self.fill_threads = 0
        self._batch_matcher: Any = None
        self._host_mask: torch.Tensor | None = None  # int32 [rows, ceil(V/32)], reused

    def submit(self, seq: Sequence) -> concurrent.futures.Future[Any]:
        """Start (or find in the cache) the compile of the sequence's grammar."""
        spec = seq.sampling_params.structured
        assert spec is not None
        return self.compiler.submit(spec)

    # -- admission: a constrained sequence waits for its grammar, nobody else does -------------

    def hold(self, seq: Sequence) -> None:
        """Keep `seq` out of the scheduler until its grammar is compiled (`take_compiled`)."""
        self._held.append((seq, self.submit(seq)))

    @property
    def num_held(self) -> int:
        return len(self._held)

    def take_compiled(self) -> tuple[list[Sequence], list[tuple[Sequence, BaseException]]]:
        """The held sequences whose compile finished: (compiled, failed with the error).
        Sequences finished meanwhile (aborted) are dropped."""
        ready: list[Sequence] = []
        failed: list[tuple[Sequence, BaseException]] = []
        still: list[tuple[Sequence, concurrent.futures.Future[Any]]] = []
        for seq, future in self._held:
            if seq.is_finished:
                continue
            if not future.done():
                still.append((seq, future))
            elif future.exception() is not None:
                failed.append((seq, future.exception()))  # type: ignore[arg-type]
            else:
                ready.append(seq)
        self._held = still
        return ready, failed

    def wait_any(self, timeout_s: float) -> None:
        """Block up to `timeout_s` for one held compile (an engine with nothing else to do)."""
        futures = [future for _, future in self._held]
        if futures:
            concurrent.futures.wait(futures, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)

    def forget(self, seq_id: int) -> None:
        self._matchers.pop(seq_id, None)

    def _matcher(self, seq: Sequence) -> Any:
        matcher = self._matchers.get(seq.seq_id)
        if matcher is None:
            import xgrammar as xgr

            # NOTE: a cache hit on a finished compile: the engine admits a constrained sequence
            # only once its grammar is compiled (`EngineCore`), so this never waits.
            matcher = self._matchers[seq.seq_id] = xgr.GrammarMatcher(self.submit(seq).result())
        return matcher

    # -- the step ----------------------------------------------------------------------------

    def accept(self, seq: Sequence, token_id: int) -> None:
        """The update path: the sequence's sampled token advances its matcher."""
        if seq.sampling_params.structured is None:
            return
        matcher = self._matcher(seq)
        if matcher.is_terminated():
            return  # the grammar is complete: only EOS was allowed, the sequence is ending
        if not matcher.accept_token(token_id):
            # Only possible when a token bypassed the mask: the matcher keeps its state.
            log.warning("grammar rejected token %d of sequence %d", token_id, seq.seq_id)

    def bitmask(self, rows: list[SampleRow]) -> tuple[list[int], torch.Tensor] | None:
        """Called by the sampler for a step's rows: (row indices, int32 bitmask [R, ceil(V/32)])
        for the rows with a grammar, or None when no row has one."""
        # A row finished meanwhile (async: its result will be dropped) gets no mask, and no matcher.
        indices = [i for i, row in enumerate(rows)
                   if row.seq.sampling_params.structured is not None and not row.seq.is_finished]
        if not indices:
            return None
        host = self._host_mask
        if host is None or host.shape[0] < len(indices):
            import xgrammar as xgr

            host = self._host_mask = xgr.allocate_token_bitmask(max(len(indices), 64), self.vocab_size)
        matchers = [self._matcher(rows[i].seq) for i in indices]
        if self.fill_threads > 0 and len(matchers) > 1:
            if self._batch_matcher is None:
                import xgrammar as xgr

                self._batch_matcher = xgr.BatchGrammarMatcher(max_threads=self.fill_threads)
            self._batch_matcher.batch_fill_next_token_bitmask(matchers, host)
        else:
            for k, matcher in enumerate(matchers):
                matcher.fill_next_token_bitmask(host, k)
        # NOTE: a copy, so the host buffer can be refilled while the device still reads this one.
        return indices, host[: len(indices)].clone()

    def shutdown(self) -> None:
        self.compiler.shutdown()


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask(logits: torch.Tensor, row_indices: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [N, V] with rows `row_indices` [R] limited to the tokens set in `bitmask` [R, W]
    (bit j of word w allows token 32*w + j); a new tensor, the input is untouched."""
    num_rows, vocab = len(row_indices), logits.shape[1]
    shifts = _BIT_SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().view(num_rows, -1)[:, :vocab]  # [R, V]
    rows = logits.index_select(0, row_indices).masked_fill_(~allowed, float("-inf"))
    return logits.index_copy(0, row_indices, rows)
