"""`ProcessAsyncEngine`: the `AsyncEngine` interface with the `EngineCore` in a child process.

Why: with the core on a thread, the engine loop and the event loop share one GIL, and measured on
an H100 (bench/results/*-online.json) 256 concurrent streams cost the engine 23% of its output
rate on the 8B shape and ~45% on the 135M one. In a child process the engine's host work never
waits for the HTTP side; the parent only turns per-step deltas back into cumulative outputs.

Protocol (multiprocessing pipe, pickled tuples):
- parent → child: ("add", request_id, prompt_token_ids, params, arrival_time), ("abort", id), ("stop",)
- child → parent: ("ready", model_name, max_model_len, tokenizer_path, stats) once loaded and
  warmed up; ("step", acks, deltas, stats, busy) after every iteration; ("dead", text) if the
  loop fails. A delta carries only what is new since the last one (tokens, text, logprobs), so
  a step costs O(new tokens) to send, not O(everything generated so far).

NOTE: the child is started with the "spawn" method (CUDA cannot be initialised in a fork).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
from typing import Any

from appliance import errors
from appliance.config import EngineConfig
from appliance.engine.async_engine import AsyncEngine, _AbortCommand, _AddCommand
from appliance.engine.sequence import CompletionOutput, RequestOutput

logger = logging.getLogger(__name__)

# (index, text delta, token ids delta, logprobs delta or None, finish_reason, stop_reason)
_ChoiceDelta = tuple[int, str, list[int], list[Any] | None, str | None, Any]


def _error_to_wire(exc: BaseException) -> tuple[str, str, str | None, str | None]:
    return (type(exc).__name__, getattr(exc, "message", str(exc)), getattr(exc, "param", None),
            getattr(exc, "code", None))


def _error_from_wire(wire: tuple[str, str, str | None, str | None]) -> BaseException:
    name, message, param, code = wire
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.ApplianceError):
        return cls(message, param=param, code=code)
    return errors.InvalidRequestError(message, param=param, code=code)


def _child_main(config: EngineConfig, conn: Any) -> None:
    from appliance.engine.llm_engine import EngineCore

    try:
        core = EngineCore(config)
        core.warmup()
    except BaseException as exc:  # noqa: BLE001 - the parent re-raises it with this text
        conn.send(("dead", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from exc
    tokenizer_path = config.model.tokenizer or getattr(core.resolved, "tokenizer_path", None)
    conn.send(("ready", core.model_name, core.max_model_len,
               None if tokenizer_path is None else str(tokenizer_path), core.stats()))
    sent: dict[str, dict[int, tuple[int, int, int]]] = {}  # request -> index -> (text, tokens, logprobs) sent
    last_full_stats = 0.0
    try:
        while True:
            if not core.has_unfinished_requests():
                conn.poll(None)  # idle: sleep until a command comes
            acks: list[tuple[str, Any]] = []
            while conn.poll(0):
                command = conn.recv()
                if command[0] == "add":
                    _, request_id, prompt, params, arrival = command
                    try:
                        core.add_request(request_id, prompt, params, arrival_time=arrival)
                        acks.append((request_id, None))
                    except Exception as exc:  # noqa: BLE001 - a bad request must not kill the loop
                        acks.append((request_id, _error_to_wire(exc)))
                elif command[0] == "abort":
                    core.abort(command[1])
                    sent.pop(command[1], None)
                else:  # "stop"
                    return
            deltas = []
            if core.has_unfinished_requests():
                for output in core.step():
                    marks = sent.setdefault(output.request_id, {})
                    choices: list[_ChoiceDelta] = []
                    for out in output.outputs:
                        text_n, tok_n, lp_n = marks.get(out.index, (0, 0, 0))
                        logprobs = None if out.logprobs is None else out.logprobs[lp_n:]
                        choices.append((out.index, out.text[text_n:], out.token_ids[tok_n:], logprobs,
                                        out.finish_reason, out.stop_reason))
                        marks[out.index] = (len(out.text), len(out.token_ids), len(out.logprobs or ()))
                    if output.finished:
                        del sent[output.request_id]
                    deltas.append((output.request_id, output.finished, output.num_cached_tokens,
                                   output.metrics, choices))
            now = time.monotonic()
            full = now - last_full_stats >= 0.25 or not core.has_unfinished_requests()
            if full:
                last_full_stats = now
            conn.send(("step", acks, deltas, core.stats(include_requests=full), core.has_unfinished_requests()))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return
    except BaseException as exc:  # noqa: BLE001 - report, then exit non-zero
        logger.exception("engine process failed")
        try:
            conn.send(("dead", repr(exc)))
        finally:
            raise SystemExit(1) from exc


class ProcessAsyncEngine(AsyncEngine):
    """Drop-in for AsyncEngine; build it with `await ProcessAsyncEngine.spawn(config)`."""

    def __init__(self, process: Any, conn: Any, ready: tuple[Any, ...]) -> None:
        from appliance.models.tokenizer import load_tokenizer

        _, model_name, max_model_len, tokenizer_path, stats = ready
        core_view = _CoreView(load_tokenizer(tokenizer_path) if tokenizer_path else None, model_name,
                              max_model_len, stats)
        super().__init__(core_view)
        self._process = process
        self._conn = conn
        self._send_lock = threading.Lock()
        # request -> index -> [text, token ids, logprobs]: the cumulative state rebuilt here.
        self._cumulative: dict[str, dict[int, list[Any]]] = {}

    @classmethod
    async def spawn(cls, config: EngineConfig, *, timeout_s: float = 3600.0) -> ProcessAsyncEngine:
        """Start the child, wait until its model is loaded and warmed up (typed errors re-raised)."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_child_main, args=(config, child), name="llm-appliance-engine", daemon=False)
        process.start()
        child.close()
        ready = await asyncio.to_thread(cls._wait_ready, parent, process, timeout_s)
        return cls(process, parent, ready)

    @staticmethod
    def _wait_ready(conn: Any, process: Any, timeout_s: float) -> tuple[Any, ...]:
        if not conn.poll(timeout_s):
            process.kill()
            raise errors.EngineUnavailableError(f"the engine process did not start within {timeout_s:.0f} s")
        try:
            message = conn.recv()
        except EOFError:  # killed before it could say why
            process.join()
            raise errors.ModelLoadError(f"the engine process exited with status {process.exitcode} while "
                                        "loading (see its log)") from None
        if message[0] != "ready":
            raise errors.ModelLoadError(f"the engine process failed while loading: {message[1]}")
        return message

    @property
    def pid(self) -> int:
        return int(self._process.pid)

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        try:
            self._send(("stop",))
        except (OSError, ValueError):
            pass
        await asyncio.to_thread(self._process.join, 30)
        if self._process.is_alive():
            self._process.kill()
        await super().shutdown()

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _submit(self, command: _AddCommand | _AbortCommand) -> None:
        if not self._busy:
            self._busy = True
            self._last_progress = time.monotonic()
        try:
            if isinstance(command, _AddCommand):
                self._cumulative[command.request_id] = {}
                self._send(("add", command.request_id, command.prompt_token_ids, command.params,
                            command.arrival_time))
            else:
                self._cumulative.pop(command.request_id, None)
                self._send(("abort", command.request_id))
        except (OSError, ValueError) as exc:  # the child is gone; the reader reports it
            logger.debug("cannot reach the engine process: %r", exc)

    def _run(self) -> None:  # the thread body of AsyncEngine is not used here
        raise NotImplementedError

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "dead":
                    raise errors.EngineDeadError(f"the engine process failed: {message[1]}")
                _, acks, deltas, stats, busy = message
                self._stats = stats
                self._last_progress = time.monotonic()
                self._busy = busy
                outputs = []
                for request_id, *rest in deltas:
                    output = self._rebuild(request_id, *rest)
                    if output is not None:
                        outputs.append((request_id, output))
                wire_acks = [(request_id, None if wire is None else _error_from_wire(wire)) for request_id, wire in acks]
                if wire_acks or outputs:
                    self._post(wire_acks, outputs)
        except (EOFError, OSError) as exc:
            if self._process.exitcode == 0 or self._stopping_requested():
                return
            self._die(errors.EngineDeadError(f"the engine process exited unexpectedly ({exc!r})"))
        except BaseException as exc:  # noqa: BLE001
            self._die(exc)

    def _stopping_requested(self) -> bool:
        self._process.join(1.0)
        return self._process.exitcode == 0

    def _die(self, exc: BaseException) -> None:
        logger.error("engine process failed: %r", exc)
        self._error = exc
        self._busy = False
        self._post_dead(exc)

    def _rebuild(self, request_id: str, finished: bool, num_cached: int, metrics: Any,
                 choices: list[_ChoiceDelta]) -> RequestOutput | None:
        state = self._cumulative.get(request_id)
        if state is None:  # aborted meanwhile: its consumer is gone
            return None
        for index, text, token_ids, logprobs, _finish, _stop in choices:
            acc = state.setdefault(index, ["", [], [] if logprobs is not None else None])
            acc[0] += text
            acc[1].extend(token_ids)
            if logprobs is not None:
                acc[2].extend(logprobs)
        finish = {c[0]: (c[4], c[5]) for c in choices}
        outputs = [
            CompletionOutput(index=i, text=acc[0], token_ids=list(acc[1]),
                             finish_reason=finish.get(i, (None, None))[0], stop_reason=finish.get(i, (None, None))[1],
                             logprobs=None if acc[2] is None else list(acc[2]))
            for i, acc in sorted(state.items())
        ]
        if finished:
            self._cumulative.pop(request_id, None)
        return RequestOutput(request_id, [], outputs, finished, num_cached_tokens=num_cached, metrics=metrics)


class _CoreView:
    """What AsyncEngine.__init__ reads from a core, for a core that lives elsewhere."""

    def __init__(self, tokenizer: Any, model_name: str, max_model_len: int, stats: Any) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self._stats = stats

    def stats(self, include_requests: bool = False) -> Any:
        return self._stats
