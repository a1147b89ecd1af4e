"""The one bridge between asyncio and the engine thread.

`EngineCore` is not thread-safe, so exactly one thread (started by `AsyncEngine.start`) drives it.
The event loop never touches the core: it puts commands (add, abort) on a locked deque and wakes
the thread; the thread drains that deque at the top of every iteration, runs one `step()`, and
hands the step's outputs back to the loop with ONE `call_soon_threadsafe` per step (not one per
request), which keeps the HTTP side's cost to the engine's throughput small.

Each request gets an `asyncio.Queue` on the loop. Outputs are cumulative, so a slow consumer
only needs the newest one: `generate` drains the queue and yields the last item it finds.

NOTE: when the thread has no work it sleeps on a `threading.Condition` (no busy spin). If
`step()` raises, the engine is dead: every in-flight request fails with `EngineDeadError`, new
requests are refused with it, and `dead_event` is set so the daemon can exit non-zero.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from appliance.engine.sequence import CompletionOutput, EngineStats, RequestOutput, SamplingParams
from appliance.errors import ApplianceError, EngineDeadError, EngineUnavailableError

logger = logging.getLogger(__name__)

# Items put on a request's asyncio queue besides RequestOutput.
_ABORTED = object()  # the request was aborted from outside (operator cancel, shutdown)
_REQUEST_SNAPSHOT_INTERVAL_S = 0.25
# ~3x what one streamed delivery costs the event loop (measured ~30 us on an H100 host): with 8
# streams each gets every step (< 1 ms apart); with 256, one update per ~26 ms.
_DELIVERY_BUDGET_S = 100e-6


@dataclasses.dataclass
class _AddCommand:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclasses.dataclass
class _AbortCommand:
    request_id: str


class _RequestStream:
    """The loop-side end of one request: its queue and whether the engine accepted it."""

    __slots__ = ("queue", "accepted", "finished", "final_only", "delivered", "last_delivery")

    def __init__(self, loop: asyncio.AbstractEventLoop, final_only: bool) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.final_only = final_only
        self.delivered = False
        self.last_delivery = 0.0
        # Resolved when the engine thread has run add_request (None) or it raised (the error).
        self.accepted: asyncio.Future[BaseException | None] = loop.create_future()
        self.finished = False


class AsyncEngine:
    """Async facade over an `EngineCore` driven by a dedicated thread.

    Contract: `generate` is the only way to run a request; closing or cancelling its iterator
    before the final output aborts the request in the engine (its KV blocks are freed).
    `stats()` and `is_progressing()` are safe from any thread and cost a few attribute reads.
    """

    def __init__(self, core: Any) -> None:
        self._core = core
        self.tokenizer = core.tokenizer
        self.model_name: str = core.model_name
        self.max_model_len: int = core.max_model_len
        self._cond = threading.Condition()
        self._commands: deque[_AddCommand | _AbortCommand] = deque()  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, _RequestStream] = {}  # loop-side only
        self._stats: EngineStats = core.stats()
        self._busy = False  # the thread has work (written by the thread)
        self._last_progress = time.monotonic()  # last step end, or when work began after idling
        self._error: BaseException | None = None
        self._last_full_stats = 0.0
        # Loop time allowed per stream per delivery (0: deliver every step). See _deliver.
        self.delivery_budget_s = _DELIVERY_BUDGET_S
        self.dead_event = asyncio.Event()

    def render_chat(self, messages: list[dict[str, Any]], *,
                    no_template_hint: str = "send a plain prompt instead",
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt token ids of a chat conversation (the model's chat template, the assistant's
        turn opened); InvalidRequestError when there is no template or it rejects the messages."""
        from appliance.models.tokenizer import apply_chat_template

        return apply_chat_template(self.tokenizer, messages, no_template_hint=no_template_hint, tools=tools)

    # ----- properties -----------------------------------------------------------------------

    @property
    def dead(self) -> bool:
        return self._error is not None

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def num_inflight(self) -> int:
        return len(self._streams)

    def stats(self) -> EngineStats:
        """The snapshot taken by the engine thread after its latest step (or command)."""
        return self._stats

    def is_progressing(self, stall_timeout_s: float) -> bool:
        """False when the engine died, or has work and finished no step for `stall_timeout_s`."""
        if self._error is not None or (self._thread is not None and not self._thread.is_alive()):
            return False
        if not self._busy:
            return True
        return time.monotonic() - self._last_progress < stall_timeout_s

    # ----- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=False)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the thread after its current step; requests still running end as aborted."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        for stream in list(self._streams.values()):
            if not stream.accepted.done():
                stream.accepted.set_result(EngineUnavailableError("the engine is shutting down"))
            stream.queue.put_nowait(_ABORTED)

    async def wait_dead(self) -> BaseException:
        """Return the error that killed the engine thread, once it has."""
        await self.dead_event.wait()
        assert self._error is not None
        return self._error

    # ----- requests ---------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *, final_only: bool = False
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs until the final one (finished=True).

        `final_only` (non-streaming consumers): only the first output and the final one are
        delivered, so the event loop does not wake this consumer at every step.

        Raises before the first item when the engine rejects the request (InvalidRequestError,
        PromptTooLongError, …), and EngineDeadError whenever the engine dies.
        """
        if self._error is not None:
            raise EngineDeadError(f"the engine loop has failed: {self._error!r}")
        if self._thread is None or self._loop is None:
            raise EngineUnavailableError("the engine is not started")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        stream = _RequestStream(self._loop, final_only)
        self._streams[request_id] = stream
        self._submit(_AddCommand(request_id, list(prompt_token_ids), params, time.monotonic()))
        last: RequestOutput | None = None
        try:
            rejected = await stream.accepted
            if rejected is not None:
                stream.finished = True
                raise rejected
            while True:
                item = await stream.queue.get()
                # Cumulative outputs: skip to the newest one already delivered.
                while not stream.queue.empty() and isinstance(item, RequestOutput) and not item.finished:
                    last = item
                    item = stream.queue.get_nowait()
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
                if item is _ABORTED:
                    stream.finished = True
                    yield _aborted_output(request_id, prompt_token_ids, params, last)
                    return
                last = item
                if item.finished:
                    stream.finished = True
                yield item
                if stream.finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not stream.finished and self._error is None:
                # The consumer went away (client disconnect, cancel): free the engine's blocks.
                self._submit(_AbortCommand(request_id))

    async def abort(self, request_id: str) -> None:
        """Abort from outside the consumer (operator cancel): the stream ends as 'abort'."""
        stream = self._streams.get(request_id)
        self._submit(_AbortCommand(request_id))
        if stream is not None and not stream.finished:
            stream.queue.put_nowait(_ABORTED)

    def _submit(self, command: _AddCommand | _AbortCommand) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    # ----- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        core = self._core
        try:
            while True:
                with self._cond:
                    while not self._commands and not self._stopping and not core.has_unfinished_requests():
                        self._busy = False
                        self._cond.wait()
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                if not self._busy:
                    self._busy = True
                    self._last_progress = time.monotonic()  # an idle spell is not a stall
                deliveries: list[tuple[str, Any]] = []
                acks: list[tuple[str, BaseException | None]] = []
                for command in commands:
                    if isinstance(command, _AddCommand):
                        try:
                            core.add_request(
                                command.request_id, command.prompt_token_ids, command.params,
                                arrival_time=command.arrival_time,
                            )
                            acks.append((command.request_id, None))
                        except Exception as exc:  # noqa: BLE001 - a bad request must not kill the loop
                            if not isinstance(exc, ApplianceError):
                                logger.exception("add_request failed for %s", command.request_id)
                            acks.append((command.request_id, exc))
                    else:
                        core.abort(command.request_id)
                if core.has_unfinished_requests():
                    for output in core.step():
                        deliveries.append((output.request_id, output))
                    self._last_progress = time.monotonic()
                self._stats = self._snapshot(core)
                if acks or deliveries:
                    self._post(acks, deliveries)
        except BaseException as exc:  # noqa: BLE001 - any failure of the loop kills the engine
            logger.exception("engine loop failed")
            self._error = exc
            self._busy = False
            self._post_dead(exc)

    def _snapshot(self, core: Any) -> EngineStats:
        # The per-request list costs a little per request: refresh it a few times a second only.
        now = time.monotonic()
        if now - self._last_full_stats >= _REQUEST_SNAPSHOT_INTERVAL_S or not core.has_unfinished_requests():
            self._last_full_stats = now
            return core.stats(include_requests=True)
        stats = core.stats()
        stats.requests = self._stats.requests
        return stats

    def _post(self, acks: list[tuple[str, BaseException | None]], deliveries: list[tuple[str, Any]]) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, acks, deliveries)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _post_dead(self, exc: BaseException) -> None:
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._fail_all, exc)
        except RuntimeError:
            pass

    # ----- loop-side delivery -----------------------------------------------------------------

    def _deliver(self, acks: list[tuple[str, BaseException | None]], deliveries: list[tuple[str, Any]]) -> None:
        for request_id, rejected in acks:
            stream = self._streams.get(request_id)
            if stream is not None and not stream.accepted.done():
                stream.accepted.set_result(rejected)
        # NOTE: the loop's work per delivery holds the GIL the engine thread also needs. Pacing
        # intermediate outputs (outputs are cumulative, so a skipped one loses nothing) keeps
        # that work at about one delivery per stream every `len(streams) × budget` seconds.
        now = time.monotonic()
        min_interval_s = len(self._streams) * self.delivery_budget_s
        for request_id, item in deliveries:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if stream.delivered and not item.finished and (
                stream.final_only or now - stream.last_delivery < min_interval_s
            ):
                continue
            stream.delivered = True
            stream.last_delivery = now
            stream.queue.put_nowait(item)

    def _fail_all(self, exc: BaseException) -> None:
        error = EngineDeadError(f"the engine loop has failed: {exc!r}")
        for stream in self._streams.values():
            if not stream.accepted.done():
                stream.accepted.set_result(error)
            stream.queue.put_nowait(error)
        self.dead_event.set()


def _aborted_output(
    request_id: str, prompt_token_ids: list[int], params: SamplingParams, last: RequestOutput | None
) -> RequestOutput:
    """The final output of a request aborted from outside: what it had, finish_reason 'abort'."""
    if last is None:
        outputs = [CompletionOutput(index=i, text="", token_ids=[], finish_reason="abort") for i in range(params.n)]
        return RequestOutput(request_id, list(prompt_token_ids), outputs, finished=True)
    outputs = [
        dataclasses.replace(o, finish_reason=o.finish_reason or "abort") for o in last.outputs
    ]
    return dataclasses.replace(last, outputs=outputs, finished=True)
