"""How the front end reaches the engine core: the `EngineCoreClient` protocol, the in-process
client (`InprocClient`, CPU default and most tests), and `make_client` which picks one from
`engine.process` ("auto": a separate process on CUDA, in-process on CPU).

A client delivers, on the event loop, one `StepOutputs` per engine step (only the requests that
changed) to the sink it was started with, and reports the core's death once. Both clients
run the same `EngineCore.step()`; they differ in where it runs:

- `InprocClient`: a thread of this process drives the core. Commands go on a locked deque, the
  thread drains it at the top of every iteration, steps, and hands the outputs to the loop with
  ONE `call_soon_threadsafe` per step. The core's host work shares this process's GIL with
  the HTTP side.
- `ProcessClient` (`engine/core_process.py`): the core runs in a child process, with its own
  GIL; typed messages (`engine/messages.py`) over a Unix socket pair.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.config import EngineConfig
from appliance.engine.messages import AbortRequests, AddRequest, StepOutputs, WireError
from appliance.engine.outputs import EngineStats
from appliance.errors import ApplianceError, ConfigError

log = logging.getLogger(__name__)

# Test-only hooks, never set in production: while the file named by the first exists, every
# engine step blocks (a real stall of the engine, for the watchdog tests); while the file named
# by the second exists, every engine step raises (a real engine death).
TEST_STALL_FILE_ENV = "LLM_APPLIANCE_TEST_STALL_FILE"
TEST_FAIL_FILE_ENV = "LLM_APPLIANCE_TEST_FAIL_FILE"
_REQUEST_SNAPSHOT_INTERVAL_S = 0.25  # the per-request list in the stats costs a little per request


@dataclass(frozen=True)
class EngineInfo:
    """What the front end needs to know about the core (fixed once it is loaded)."""

    model_name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Any  # a transformers tokenizer, or None for a named dummy architecture


class OutputSink(Protocol):
    """The front end's side: both methods are called on its event loop."""

    def on_outputs(self, outputs: StepOutputs) -> None: ...

    def on_dead(self, error: BaseException) -> None: ...


class EngineCoreClient(Protocol):
    """Contract: `start` once on the loop; `add_request`/`abort` never block the loop for long
    and never raise when the core is gone (its death is reported to the sink instead);
    `stats()` and `is_progressing()` are safe from any thread and cost a few attribute reads."""

    info: EngineInfo

    def start(self, loop: asyncio.AbstractEventLoop, sink: OutputSink) -> None: ...

    def add_request(self, request: AddRequest) -> None: ...

    def abort(self, request_ids: list[str]) -> None: ...

    async def shutdown(self) -> None: ...

    def stats(self) -> EngineStats: ...

    def is_progressing(self, stall_timeout_s: float) -> bool: ...


def resolve_process_mode(config: EngineConfig) -> str:
    """"inline" or "separate" from engine.process ("auto": separate exactly when the model runs
    on CUDA, where the engine's host work per step is what limits a small model's speed)."""
    mode = config.process
    if mode in ("inline", "separate"):
        return mode
    if mode != "auto":
        raise ConfigError(f"engine.process must be \"auto\", \"inline\" or \"separate\"; got {mode!r}",
                          param="engine.process")
    device = config.model.device
    if device == "auto":
        import torch

        return "separate" if torch.cuda.is_available() else "inline"
    return "separate" if device.startswith("cuda") else "inline"


def install_test_hooks(core: Any) -> None:
    """The test-only stall/fail files (see TEST_STALL_FILE_ENV); nothing without the variables."""
    stall_path = os.environ.get(TEST_STALL_FILE_ENV)
    fail_path = os.environ.get(TEST_FAIL_FILE_ENV)
    if not stall_path and not fail_path:
        return
    step = core.step

    def hooked_step() -> Any:
        while stall_path and os.path.exists(stall_path):
            time.sleep(0.05)
        if fail_path and os.path.exists(fail_path):
            raise RuntimeError(f"test-only failure: {fail_path} exists")
        return step()

    core.step = hooked_step
    log.warning("TEST ONLY: engine steps block while %s exists and fail while %s exists", stall_path, fail_path)


def engine_info(core: Any) -> EngineInfo:
    return EngineInfo(core.model_name, core.max_model_len, core.vocab_size, core.tokenizer)


class InprocClient:
    """Drives an `EngineCore` (or anything with its methods) on a thread of this process."""

    def __init__(self, core: Any) -> None:
        self._core = core
        self.info = engine_info(core)
        self._cond = threading.Condition()
        self._commands: deque[AddRequest | AbortRequests] = deque()  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: OutputSink | None = None
        self._stats: EngineStats = core.stats(include_requests=True)
        self._busy = False  # the thread has work (written by the thread)
        self._last_progress = time.monotonic()  # last step end, or when work began after idling
        self._last_full_stats = 0.0
        self._dead = False

    def start(self, loop: asyncio.AbstractEventLoop, sink: OutputSink) -> None:
        assert self._thread is None, "started twice"
        self._loop, self._sink = loop, sink
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=False)
        self._thread.start()

    def add_request(self, request: AddRequest) -> None:
        self._submit(request)

    def abort(self, request_ids: list[str]) -> None:
        self._submit(AbortRequests(request_ids))

    def _submit(self, command: AddRequest | AbortRequests) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    async def shutdown(self) -> None:
        """Stop the thread after its current step."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def stats(self) -> EngineStats:
        return self._stats

    def is_progressing(self, stall_timeout_s: float) -> bool:
        if self._dead or (self._thread is not None and not self._thread.is_alive()):
            return False
        if not self._busy:
            return True
        return time.monotonic() - self._last_progress < stall_timeout_s

    # ----- the engine thread --------------------------------------------------------------

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
                rejected = apply_commands(core, commands)
                outputs = core.step() if core.has_unfinished_requests() else []
                self._last_progress = time.monotonic()
                self._stats = self._snapshot()
                if outputs or rejected:
                    self._post(self._deliver, StepOutputs(outputs, rejected, None, True))
        except BaseException as exc:  # noqa: BLE001 - any failure of the loop kills the engine
            log.exception("engine loop failed")
            self._dead = True
            self._busy = False
            self._post(self._die, exc)

    def _snapshot(self) -> EngineStats:
        now = time.monotonic()
        core = self._core
        if now - self._last_full_stats >= _REQUEST_SNAPSHOT_INTERVAL_S or not core.has_unfinished_requests():
            self._last_full_stats = now
            return core.stats(include_requests=True)
        stats = core.stats()
        stats.requests = self._stats.requests
        return stats

    def _post(self, callback: Callable[[Any], None], arg: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _deliver(self, outputs: StepOutputs) -> None:
        assert self._sink is not None
        self._sink.on_outputs(outputs)

    def _die(self, exc: BaseException) -> None:
        assert self._sink is not None
        self._sink.on_dead(exc)


def apply_commands(core: Any, commands: list[Any]) -> list[tuple[str, WireError]]:
    """Run add/abort commands on the core; returns the requests it refused (and why)."""
    rejected: list[tuple[str, WireError]] = []
    for command in commands:
        if isinstance(command, AddRequest):
            try:
                core.add_request(command.request_id, command.prompt_token_ids, command.params,
                                 arrival_time=command.arrival_time)
            except Exception as exc:  # noqa: BLE001 - a bad request must not kill the engine
                if not isinstance(exc, ApplianceError):
                    log.exception("add_request failed for %s", command.request_id)
                rejected.append((command.request_id, WireError.of(exc)))
        elif isinstance(command, AbortRequests):
            for request_id in command.request_ids:
                core.abort(request_id)
    return rejected


async def make_client(config: EngineConfig, *, on_progress: Callable[[str], None] | None = None,
                      load_timeout_s: float = 3600.0) -> EngineCoreClient:
    """Load the model and return a client for it, as engine.process says (see the module doc).

    Inline: the core is built and warmed up on a worker thread (the loop stays free).
    """
    if resolve_process_mode(config) == "separate":
        from appliance.engine.core_process import ProcessClient

        return await ProcessClient.spawn(config, on_progress=on_progress, timeout_s=load_timeout_s)

    def load() -> Any:
        from appliance.engine.llm_engine import EngineCore

        core = EngineCore(config)
        if on_progress is not None:
            on_progress(f"warming up {core.model_name}")
        core.warmup()
        install_test_hooks(core)
        return core

    return InprocClient(await asyncio.to_thread(load))
