"""The front end of the engine: the asyncio side every server route talks to.

`AsyncEngine` wraps an `EngineCoreClient` (in-process thread or separate process, see
`core_client.py`). It validates a request before the core sees it, keeps one
`OutputAccumulator` per request, and wakes that request's consumer when a step changed it.

Streaming contract: `generate()` yields `RequestDelta`s, each holding everything new since the
previous one. A consumer that keeps up gets one delta per engine step; one that is slower (its
client reads slowly, or the loop is busy) gets the steps it missed merged into one, so it
never falls behind by more than a single item and no work piles up per token.

NOTE: all of this runs on the event loop (no locks). If the core dies, every in-flight request
fails with `EngineDeadError`, new requests are refused with it, and `dead_event` is set so the
daemon can exit non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from appliance.engine.core_client import EngineCoreClient
from appliance.engine.messages import AddRequest, StepOutputs
from appliance.engine.outputs import EngineStats, OutputAccumulator, RequestDelta
from appliance.engine.sequence import SamplingParams, validate_request
from appliance.errors import EngineDeadError, EngineUnavailableError

logger = logging.getLogger(__name__)


class _Stream:
    """The loop-side end of one request."""

    __slots__ = ("acc", "n", "final_only", "woken", "wakeup", "error", "finished", "aborted", "push")

    def __init__(self, request_id: str, n: int, final_only: bool) -> None:
        self.acc = OutputAccumulator(request_id)
        self.n = n
        self.final_only = final_only
        self.woken = False  # final_only: the first delta has woken the consumer
        self.wakeup = asyncio.Event()
        self.error: BaseException | None = None
        self.finished = False  # the consumer has had the last delta
        self.aborted = False  # aborted from outside (operator cancel, shutdown)
        self.push: Callable[[RequestDelta], bool] | None = None  # see AsyncEngine.set_push


class AsyncEngine:
    """Async facade over an engine core client.

    Contract: `generate` is the only way to run a request; closing or cancelling its iterator
    before the final delta aborts the request in the core (its KV blocks are freed).
    `stats()` and `is_progressing()` are safe from any thread and cost a few attribute reads.
    """

    def __init__(self, client: EngineCoreClient) -> None:
        self._client = client
        info = client.info
        self.tokenizer = info.tokenizer
        self.model_name: str = info.model_name
        self.max_model_len: int = info.max_model_len
        self.vocab_size: int = info.vocab_size
        self._streams: dict[str, _Stream] = {}
        self._error: BaseException | None = None
        self._started = False
        self.dead_event = asyncio.Event()

    @property
    def client(self) -> EngineCoreClient:
        return self._client

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
        return self._started

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def num_inflight(self) -> int:
        return len(self._streams)

    def stats(self) -> EngineStats:
        """The core's snapshot after its latest step (from the other process, when separate)."""
        return self._client.stats()

    def is_progressing(self, stall_timeout_s: float) -> bool:
        """False when the core died, or has work and finished no step for `stall_timeout_s`."""
        return self._error is None and self._client.is_progressing(stall_timeout_s)

    # ----- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._client.start(asyncio.get_running_loop(), self)

    async def shutdown(self) -> None:
        """Stop the core after its current step; requests still running end as aborted."""
        await self._client.shutdown()
        for stream in self._streams.values():
            self._abort_stream(stream)

    async def wait_dead(self) -> BaseException:
        """Return the error that killed the core, once it has."""
        await self.dead_event.wait()
        assert self._error is not None
        return self._error

    # ----- requests ---------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *, final_only: bool = False
    ) -> AsyncIterator[RequestDelta]:
        """Yield deltas until the last one (finished=True); see the module docstring.

        `final_only` (non-streaming consumers): the first delta (its time is the request's time to
        first token), then everything else merged into one at the end.
        Raises before the first item when the request is invalid (InvalidRequestError,
        PromptTooLongError, …), and EngineDeadError whenever the core dies.
        """
        if self._error is not None:
            raise EngineDeadError(f"the engine has failed: {self._error}")
        if not self._started:
            raise EngineUnavailableError("the engine is not started")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        validate_request(prompt_token_ids, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        stream = _Stream(request_id, params.n, final_only)
        self._streams[request_id] = stream
        self._client.add_request(AddRequest(request_id, list(prompt_token_ids), params, time.monotonic()))
        try:
            while True:
                await stream.wakeup.wait()
                stream.wakeup.clear()
                if stream.error is not None:
                    stream.finished = True
                    raise stream.error
                delta = stream.acc.take()
                if delta is None:
                    continue
                if delta.finished:
                    stream.finished = True
                yield delta
                if stream.finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not stream.finished and not stream.aborted and self._error is None:
                # The consumer went away (client disconnect, cancel): free the core's blocks.
                self._client.abort([request_id])

    def set_push(self, request_id: str, push: Callable[[RequestDelta], bool] | None) -> None:
        """Let the consumer of `request_id` take its deltas synchronously, inside the step's
        delivery, instead of being woken for each (the SSE route writes them to the socket from
        there: one engine step, one event, no task switch per request).

        `push(delta)` is called with a delta only when nothing older is waiting for the consumer;
        it returns False to decline (it is busy, or its client reads slowly), and the delta then
        takes the normal path: merged in the accumulator, the consumer woken. The last delta
        (finished) always takes the normal path. An exception from `push` fails the request.
        """
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.push = push

    async def abort(self, request_id: str) -> None:
        """Abort from outside the consumer (operator cancel): the stream ends as 'abort'."""
        stream = self._streams.get(request_id)
        if stream is None or stream.finished or stream.aborted:
            return
        self._client.abort([request_id])
        self._abort_stream(stream)

    @staticmethod
    def _abort_stream(stream: _Stream) -> None:
        if stream.finished or stream.aborted:
            return
        stream.aborted = True
        if not stream.acc.finished:
            stream.acc.abort(stream.n)
        stream.wakeup.set()

    # ----- OutputSink: called by the client on the loop ----------------------------------------

    def on_outputs(self, outputs: StepOutputs) -> None:
        streams = self._streams
        for delta in outputs.outputs:
            stream = streams.get(delta.request_id)
            if stream is None or stream.aborted:
                continue  # its consumer is gone
            push = stream.push
            if push is not None and not delta.finished and stream.error is None and not stream.acc.has_news:
                try:
                    if push(delta):
                        continue
                except Exception as exc:  # noqa: BLE001 - one request's failure, not the loop's
                    logger.exception("streaming %s failed", delta.request_id)
                    stream.push = None
                    stream.error = exc
                    stream.wakeup.set()
                    continue
            stream.acc.add(delta)
            if not stream.final_only or delta.finished or not stream.woken:
                stream.woken = True
                stream.wakeup.set()
        for request_id, error in outputs.rejected:
            stream = streams.get(request_id)
            if stream is not None:
                stream.error = error.to_exception()
                stream.wakeup.set()

    def on_dead(self, error: BaseException) -> None:
        if self._error is not None:
            return
        self._error = error
        failure = EngineDeadError(f"the engine has failed: {error}")
        for stream in self._streams.values():
            stream.error = failure
            stream.wakeup.set()
        self.dead_event.set()
