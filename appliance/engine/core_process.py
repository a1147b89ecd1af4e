"""The engine core in its own process (`engine.process = "separate"`, the default on CUDA).

Why: in one process the engine's host work per step (scheduling, inputs, stop checks, outputs)
and the HTTP side (parsing, SSE, JSON) take turns on one GIL; a small model whose step is mostly
host time loses most of its speed that way. Here the child owns the GPU and the `EngineCore`,
the daemon keeps HTTP, and they exchange the typed messages of `engine/messages.py`.

Transport (chosen by `bench/engine_ipc.py`, see docs/ARCHITECTURE.md): MessagePack via msgspec
over a Unix socket pair, each message framed by a 4-byte big-endian length (the framing of
`multiprocessing.Connection`, which the child uses as is). The parent reads and writes through
asyncio (`create_unix_connection`): no thread, no blocking write on the event loop, and the
outputs of a step are decoded on the loop as they arrive, one message per step.

The child: loads and warms up the model (reporting `Progress`, then `Ready`), then loops: read
every queued command, `step()`, send one `StepOutputs`; when idle it sleeps in `poll`. It ignores
SIGINT/SIGTERM (the daemon drains first, then sends `Shutdown`), and exits when its socket
closes (the daemon is gone). Any exception in a step is sent as `Failure` before it exits 1.

NOTE: the child is started with the "spawn" method (CUDA cannot be initialised in a fork).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import msgspec

from appliance import errors
from appliance.config import EngineConfig
from appliance.engine.core_client import (
    _REQUEST_SNAPSHOT_INTERVAL_S,
    EngineInfo,
    OutputSink,
    apply_commands,
    install_test_hooks,
)
from appliance.engine.messages import (
    AbortRequests,
    AddRequest,
    Failure,
    FromCore,
    Progress,
    Ready,
    Shutdown,
    StepOutputs,
    ToCore,
    WireError,
)
from appliance.engine.outputs import EngineStats

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!i")  # multiprocessing.Connection's frame header (messages < 2 GiB)


# ----- the child ----------------------------------------------------------------------------


def _child_main(config: EngineConfig, conn: Any, log_level: str) -> None:
    # Before torch loads OpenMP: its idle threads sleep instead of spinning. Spinning workers of
    # this process took the cores the daemon's event loop needed between steps (2 CPU cores: a
    # lone request's steps 3 ms inline, 83 ms with an engine process; 3 ms with PASSIVE).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from appliance.engine.llm_engine import EngineCore
    from appliance.gc_watch import watch_gc_pauses
    from appliance.logs import setup_logging

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    setup_logging(log_level)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(ToCore)

    def send(message: FromCore) -> None:
        conn.send_bytes(encoder.encode(message))

    try:
        core = EngineCore(config)
        send(Progress(f"warming up {core.model_name}"))
        core.warmup()
        install_test_hooks(core)
        watch_gc_pauses("engine")  # a long collection here is a step that waits: logged
    except BaseException as exc:  # noqa: BLE001 - the parent re-raises it with this text
        send(Failure(WireError.of(exc)))
        raise SystemExit(1) from exc
    tokenizer_path = config.model.tokenizer or getattr(core.resolved, "tokenizer_path", None)
    send(Ready(core.model_name, core.max_model_len, core.vocab_size,
               None if tokenizer_path is None else str(tokenizer_path), core.stats(include_requests=True)))
    last_full_stats = 0.0
    try:
        while True:
            if not core.has_unfinished_requests():
                conn.poll(None)  # idle: sleep until a command comes
            commands = []
            while conn.poll(0):
                command = decoder.decode(conn.recv_bytes())
                if isinstance(command, Shutdown):
                    return
                commands.append(command)
            rejected = apply_commands(core, commands)
            outputs = core.step() if core.has_unfinished_requests() else []
            busy = core.has_unfinished_requests()
            now = time.monotonic()
            full = now - last_full_stats >= _REQUEST_SNAPSHOT_INTERVAL_S or not busy
            if full:
                last_full_stats = now
            send(StepOutputs(outputs, rejected, core.stats(include_requests=full), busy))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the daemon is gone
    except BaseException as exc:  # noqa: BLE001 - report, then exit non-zero
        log.exception("engine process failed")
        try:
            send(Failure(WireError.of(exc)))
        finally:
            raise SystemExit(1) from exc


# ----- the parent ---------------------------------------------------------------------------


class _Wire(asyncio.Protocol):
    """Frames in, messages out: decodes every whole frame in the received bytes."""

    def __init__(self, on_message: Callable[[Any], None], on_lost: Callable[[], None]) -> None:
        self._buffer = bytearray()
        self._decoder = msgspec.msgpack.Decoder(FromCore)
        self._on_message = on_message
        self._on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        pos, end = 0, len(buf)
        messages = []
        view = memoryview(buf)
        try:
            while end - pos >= 4:
                (size,) = _HEADER.unpack_from(buf, pos)
                if end - pos - 4 < size:
                    break
                messages.append(self._decoder.decode(view[pos + 4 : pos + 4 + size]))
                pos += 4 + size
        finally:
            view.release()
        del buf[:pos]
        for message in messages:
            self._on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


class ProcessClient:
    """An `EngineCoreClient` whose core lives in a child process; build it with `spawn`."""

    def __init__(self, process: Any, conn: Any, info: EngineInfo, stats: EngineStats) -> None:
        self.info = info
        self._process = process
        self._conn = conn  # kept open until the transport owns a duplicate of its socket
        self._encoder = msgspec.msgpack.Encoder()
        self._transport: asyncio.Transport | None = None
        self._sink: OutputSink | None = None
        self._stats = stats
        self._busy = False
        self._last_progress = time.monotonic()
        self._stopping = False
        self._dead = False
        self._failure: WireError | None = None
        self._early: list[bytes] = []  # commands sent before the transport exists

    @classmethod
    async def spawn(cls, config: EngineConfig, *, on_progress: Callable[[str], None] | None = None,
                    timeout_s: float = 3600.0) -> ProcessClient:
        """Start the child, wait until its model is loaded and warmed up (typed errors re-raised)."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        process = ctx.Process(target=_child_main, args=(config, child, log_level), name="llm-appliance-engine",
                              daemon=False)
        process.start()
        child.close()
        # A tokenizer named in the config loads here while the child loads the model (seconds of
        # start-up); otherwise the child's resolution of the model names it in `Ready`.
        early_tokenizer = None
        if config.model.tokenizer:
            from appliance.models.tokenizer import load_tokenizer

            early_tokenizer = asyncio.ensure_future(asyncio.to_thread(load_tokenizer, config.model.tokenizer))
        try:
            ready = await asyncio.to_thread(_wait_ready, parent, process, timeout_s, on_progress)
        except BaseException:
            if process.is_alive():
                process.kill()
            parent.close()
            if early_tokenizer is not None:
                early_tokenizer.cancel()
            raise
        tokenizer = None
        if early_tokenizer is not None and ready.tokenizer_path == str(config.model.tokenizer):
            tokenizer = await early_tokenizer
        elif ready.tokenizer_path is not None:
            from appliance.models.tokenizer import load_tokenizer

            tokenizer = await asyncio.to_thread(load_tokenizer, ready.tokenizer_path)
        info = EngineInfo(ready.model_name, ready.max_model_len, ready.vocab_size, tokenizer)
        log.info("engine process %d ready", process.pid)
        return cls(process, parent, info, ready.stats)

    @property
    def pid(self) -> int:
        return int(self._process.pid)

    def start(self, loop: asyncio.AbstractEventLoop, sink: OutputSink) -> None:
        self._sink = sink
        sock = socket.socket(fileno=os.dup(self._conn.fileno()))
        self._conn.close()  # asyncio's transport owns the duplicate
        sock.setblocking(False)

        async def connect() -> None:
            transport, _ = await loop.create_unix_connection(lambda: _Wire(self._on_message, self._on_lost), sock=sock)
            self._transport = transport  # type: ignore[assignment]

        task = loop.create_task(connect())
        task.add_done_callback(lambda _: self._flush_early())

    def _flush_early(self) -> None:
        if self._transport is not None:
            for data in self._early:
                self._transport.write(data)
        self._early = []

    def add_request(self, request: AddRequest) -> None:
        if not self._busy:
            self._busy = True
            self._last_progress = time.monotonic()  # an idle spell is not a stall
        self._send(request)

    def abort(self, request_ids: list[str]) -> None:
        self._send(AbortRequests(request_ids))

    def _send(self, message: Any) -> None:
        if self._dead or self._stopping:
            return
        payload = self._encoder.encode(message)
        data = _HEADER.pack(len(payload)) + payload
        if self._transport is None:
            self._early.append(data)
        elif not self._transport.is_closing():
            self._transport.write(data)  # buffered by asyncio: never blocks the loop

    async def shutdown(self) -> None:
        """Ask the child to exit (after its current step), wait for it, kill it past 30 s."""
        if self._stopping:
            return
        self._send(Shutdown())
        self._stopping = True
        await asyncio.to_thread(self._process.join, 30)
        if self._process.is_alive():
            log.warning("engine process %d did not exit: killing it", self.pid)
            self._process.kill()
            await asyncio.to_thread(self._process.join, 10)
        if self._transport is not None:
            self._transport.close()

    def stats(self) -> EngineStats:
        return self._stats

    def is_progressing(self, stall_timeout_s: float) -> bool:
        if self._dead:
            return False
        if not self._busy:
            return True
        return time.monotonic() - self._last_progress < stall_timeout_s

    # ----- from the child ---------------------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        if isinstance(message, StepOutputs):
            self._last_progress = time.monotonic()
            self._busy = message.busy
            if message.stats is not None:
                self._stats = message.stats
            if (message.outputs or message.rejected) and self._sink is not None:
                self._sink.on_outputs(message)
        elif isinstance(message, Failure):
            self._failure = message.error

    def _on_lost(self) -> None:
        if self._stopping or self._dead:
            return
        self._dead = True
        self._busy = False
        asyncio.get_running_loop().create_task(self._report_death())

    async def _report_death(self) -> None:
        await asyncio.to_thread(self._process.join, 5)
        code = self._process.exitcode
        how = ("is still running" if code is None else
               f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}")
        cause = f": {self._failure.type_name}: {self._failure.message}" if self._failure is not None else ""
        error = errors.EngineDeadError(f"the engine process (pid {self.pid}) {how}{cause}")
        if self._sink is not None:
            self._sink.on_dead(error)


def _wait_ready(conn: Any, process: Any, timeout_s: float, on_progress: Callable[[str], None] | None) -> Ready:
    decoder = msgspec.msgpack.Decoder(FromCore)
    deadline = time.monotonic() + timeout_s
    while True:
        if not conn.poll(max(deadline - time.monotonic(), 0)):
            raise errors.EngineUnavailableError(f"the engine process did not start within {timeout_s:.0f} s")
        try:
            message = decoder.decode(conn.recv_bytes())
        except EOFError:  # killed before it could say why
            process.join()
            raise errors.ModelLoadError(f"the engine process exited with status {process.exitcode} while "
                                        "loading (see its log)") from None
        if isinstance(message, Progress):
            if on_progress is not None:
                on_progress(message.status)
        elif isinstance(message, Ready):
            return message
        elif isinstance(message, Failure):
            process.join(10)
            raise message.error.to_exception()
