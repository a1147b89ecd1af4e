"""The control socket: HTTP + JSON on a Unix socket (never TCP), for `llm-appliance ctl` and the
dashboard.

Routes: GET /status, GET /requests, POST /requests/{id}/cancel, POST /drain, POST /resume,
POST /reload, PUT /log-level, GET /events (SSE: a `stats` event, the /status body, and a
`requests` event, the /requests body, once a second), GET /history (five minutes of throughput
figures, for sparklines). Bodies are the wire types of
appliance/status.py. Errors are `{"error": {"message", "type"}}` with a 4xx/5xx status.

Who may connect is decided by the file system: the socket gets `ControlConfig.mode` (0660) and
`ControlConfig.group` when that group exists, inside the daemon's RuntimeDirectory.

One daemon per socket path: `start()` refuses (ControlSocketInUseError) when another daemon holds
the path's lock file (`<socket>.lock`, flock'ed for the daemon's life, so two daemons starting
at the same instant cannot both win) or when something answers on the path; it replaces a stale
socket file nobody listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import json
import logging
import os
import socket
import time
from collections import deque
from typing import Any, Protocol

from aiohttp import web

from appliance import __version__, gc_watch
from appliance.config import LOG_LEVELS, ControlConfig
from appliance.errors import ConfigError
from appliance.server.control_history import (
    MINUTE_S,
    RATE_HISTORY_S,
    RATE_WINDOW_S,
    History,
    Sample,
    bucket_delta,
    quantile,
    sample_metrics,
)
from appliance.status import (
    CancelResult,
    ClientUsage,
    EngineStatus,
    ErrorBody,
    Latency,
    LogLevelResult,
    PhaseResult,
    QueueStatus,
    RateHistory,
    ReloadResult,
    RequestList,
    RequestRow,
    StatusSnapshot,
    Throughput,
    format_event,
    to_json,
)

log = logging.getLogger(__name__)

EVENTS_INTERVAL_S = 1.0


class ControlSocketInUseError(RuntimeError):
    """Another live daemon answers on our control socket path."""


class Controlled(Protocol):
    """What the control socket needs from the daemon (appliance.daemon.Daemon implements it)."""

    model_name: str | None
    state: Any  # appliance.server.state.ServiceState
    engine: Any  # appliance.engine.async_engine.AsyncEngine, None while loading
    http_address: str | None
    config: Any  # appliance.config.AppConfig (the clients' quota limits)
    config_path: str | None

    def engine_progressing(self) -> bool: ...
    def server_metrics(self) -> Any: ...  # appliance.server.metrics.ServerMetrics, None before serving
    def drain(self) -> None: ...
    def resume(self) -> None: ...
    def reload(self) -> dict[str, Any]: ...
    def set_log_level(self, level: str) -> None: ...


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(to_json(obj), status=status)


def _error(status: int, message: str, error_type: str) -> web.Response:
    return web.json_response({"error": to_json(ErrorBody(message, error_type))}, status=status)


def _socket_answers(path: str) -> bool:
    """True when something accepts connections on `path`; False for a stale file (nobody
    listening) or no file. Other errors (e.g. EACCES) propagate: we cannot tell."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()
    return True


class ControlServer:
    """The aiohttp app behind the socket. `start()` binds it, `stop()` unbinds and unlinks it."""

    def __init__(self, daemon: Controlled, config: ControlConfig) -> None:
        self.daemon = daemon
        self.config = config
        self.history = History()
        self.throughput = Throughput()  # as of the latest sample
        self.rate_history: deque[Throughput] = deque(maxlen=RATE_HISTORY_S)
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._sampler: asyncio.Task[None] | None = None
        self._owns_path = False
        self._lock_file: Any = None
        self.app = web.Application()
        self.app.add_routes([
            web.get("/status", self.get_status),
            web.get("/requests", self.get_requests),
            web.post("/requests/{request_id}/cancel", self.post_cancel),
            web.post("/drain", self.post_drain),
            web.post("/resume", self.post_resume),
            web.post("/reload", self.post_reload),
            web.put("/log-level", self.put_log_level),
            web.get("/events", self.get_events),
            web.get("/history", self.get_history),
        ])

    # ----- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        path = self.config.socket_path
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
        in_use = ControlSocketInUseError(
            f"another daemon is running: it answers on the control socket {path} "
            f"(`llm-appliance ctl --socket {path} status` shows it); stop it, or give this one "
            f"another control.socket_path")
        # NOTE: binding a Unix socket replaces whatever file is at the path, so without this a
        # second daemon took the path over from a live one (and unlinked it when it stopped).
        # The lock is never unlinked: a waiter could otherwise lock a file nobody else sees.
        lock_file = open(f"{path}.lock", "a")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise in_use from None
        self._lock_file = lock_file
        if await asyncio.to_thread(_socket_answers, path):  # a daemon of a version without the lock
            raise in_use
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await self._runner.setup()
        # NOTE: the umask makes the socket appear with its final mode: no window where anyone
        # else could connect before the chmod below.
        old_umask = os.umask(0o777 & ~self.config.mode)
        try:
            # Open event streams are ended by `stop()`; nothing else here runs long.
            await web.UnixSite(self._runner, path, shutdown_timeout=2.0).start()
        finally:
            os.umask(old_umask)
        self._owns_path = True
        os.chmod(path, self.config.mode)
        self._chgrp(path)
        self._sampler = asyncio.create_task(self._sample(), name="control-sampler")
        log.info("control socket on %s (mode %04o)", path, self.config.mode)

    def _chgrp(self, path: str) -> None:
        if not self.config.group:
            return
        try:
            gid = grp.getgrnam(self.config.group).gr_gid
        except KeyError:
            log.debug("group %r does not exist; control socket keeps the daemon's group", self.config.group)
            return
        if os.stat(path).st_gid == gid:
            return  # under systemd (Group=llm-appliance) it is born with it; chown is filtered there
        try:
            os.chown(path, -1, gid)
        except OSError as e:
            log.warning("cannot give the control socket to group %r: %s", self.config.group, e)

    async def _sample(self) -> None:
        while True:
            self.take_sample()
            await asyncio.sleep(EVENTS_INTERVAL_S)

    def take_sample(self) -> None:
        now = time.monotonic()
        sample = Sample(now)
        engine = self.daemon.engine
        if engine is not None:
            stats = engine.stats()
            sample.prompt_tokens = stats.prompt_tokens_total
            sample.generation_tokens = stats.generation_tokens_total
        metrics = self.daemon.server_metrics()
        if metrics is not None:
            sample_metrics(sample, metrics)
        self.history.add(sample)
        self.history.add_requests(now, self.daemon.state.requests())
        self.throughput = self._throughput()
        self.rate_history.append(self.throughput)

    async def stop(self) -> None:
        self._stopping.set()
        if self._sampler is not None:
            self._sampler.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.socket_path)
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    # ----- snapshots ---------------------------------------------------------------------------

    def status(self) -> StatusSnapshot:
        daemon, state = self.daemon, self.daemon.state
        engine = daemon.engine
        engine_status = None
        if engine is not None:
            engine_status = EngineStatus.from_stats(engine.stats(), progressing=daemon.engine_progressing(),
                                                    dead=bool(engine.dead))
        return StatusSnapshot(
            version=__version__,
            pid=os.getpid(),
            phase=state.phase,
            model=daemon.model_name,
            uptime_s=time.monotonic() - state.started_monotonic,
            http_address=daemon.http_address,
            log_level=logging.getLevelName(logging.getLogger().level),
            inflight=state.inflight_count,
            config_path=os.path.abspath(daemon.config_path) if daemon.config_path else None,
            engine=engine_status,
            throughput=self.throughput,
            latency=self._latency(),
            queue=QueueStatus(
                running=engine_status.num_running if engine_status else 0,
                waiting=engine_status.num_waiting if engine_status else 0,
                admission_queued=state.admission.num_requests,
                rejected_total=int(self.history.samples[-1].rejected) if self.history.samples else 0,
                rejected_last_minute=self._minute_delta(lambda s: s.rejected),
            ),
            clients=self._clients(),
            daemon_gc_long_pauses=gc_watch.long_pauses_so_far(),
        )

    def _throughput(self) -> Throughput:
        window = self.history.window(RATE_WINDOW_S)
        if window is None:
            return Throughput()
        old, new = window
        dt = new.time_s - old.time_s
        return Throughput(
            prompt_tokens_per_s=(new.prompt_tokens - old.prompt_tokens) / dt,
            generation_tokens_per_s=(new.generation_tokens - old.generation_tokens) / dt,
            requests_per_s=(new.requests_finished - old.requests_finished) / dt,
            window_s=dt,
        )

    def _latency(self) -> Latency:
        window = self.history.window(MINUTE_S)
        if window is None:
            return Latency()
        old, new = window
        ttft = bucket_delta(new.ttft, old.ttft)
        itl = bucket_delta(new.inter_token, old.inter_token)
        return Latency(
            ttft_p50_s=quantile(0.5, ttft), ttft_p99_s=quantile(0.99, ttft),
            inter_token_p50_s=quantile(0.5, itl), inter_token_p99_s=quantile(0.99, itl),
            num_requests=int(ttft[-1][1]) if ttft else 0,
            window_s=new.time_s - old.time_s,
        )

    def _minute_delta(self, value: Any) -> int:
        window = self.history.window(MINUTE_S)
        return int(value(window[1]) - value(window[0])) if window else 0

    def _clients(self) -> list[ClientUsage]:
        """The configured clients (and any other name seen, e.g. "anonymous"), by name."""
        limits = {c.name: c for c in self.daemon.config.clients}
        window = self.history.window(MINUTE_S)
        new = self.history.samples[-1] if self.history.samples else Sample(0.0)
        old = window[0] if window else new
        in_flight: dict[str, int] = {}
        for row in self.daemon.state.requests():
            in_flight[row["client"]] = in_flight.get(row["client"], 0) + 1
        names = sorted(limits.keys() | new.client_requests.keys() | in_flight.keys())
        out = []
        for name in names:
            def minute(counter: str, name: str = name) -> int:
                return int(getattr(new, counter).get(name, 0.0) - getattr(old, counter).get(name, 0.0))
            limit = limits.get(name)
            out.append(ClientUsage(
                name=name,
                requests_total=int(new.client_requests.get(name, 0)),
                rejected_total=int(new.client_rejected.get(name, 0)),
                prompt_tokens_total=int(new.client_prompt_tokens.get(name, 0)),
                generation_tokens_total=int(new.client_generation_tokens.get(name, 0)),
                in_flight=in_flight.get(name, 0),
                requests_last_minute=minute("client_requests"),
                tokens_last_minute=minute("client_prompt_tokens") + minute("client_generation_tokens"),
                requests_per_minute_limit=limit.requests_per_minute if limit else 0,
                tokens_per_minute_limit=limit.tokens_per_minute if limit else 0,
                max_concurrent_requests=limit.max_concurrent_requests if limit else 0,
            ))
        return out

    def requests(self) -> RequestList:
        rates = self.history.request_tokens_per_s
        return RequestList([RequestRow(**row, tokens_per_s=rates.get(row["id"], 0.0))
                            for row in self.daemon.state.requests()])

    # ----- routes ----------------------------------------------------------------------------

    async def get_status(self, request: web.Request) -> web.Response:
        return _json(self.status())

    async def get_history(self, request: web.Request) -> web.Response:
        rates = list(self.rate_history)
        return _json(RateHistory(
            interval_s=EVENTS_INTERVAL_S,
            generation_tokens_per_s=[t.generation_tokens_per_s for t in rates],
            prompt_tokens_per_s=[t.prompt_tokens_per_s for t in rates],
            requests_per_s=[t.requests_per_s for t in rates],
        ))

    async def get_requests(self, request: web.Request) -> web.Response:
        return _json(self.requests())

    async def post_cancel(self, request: web.Request) -> web.Response:
        request_id = request.match_info["request_id"]
        if not await self.daemon.state.cancel(request_id):
            return _error(404, f"no request {request_id!r} in flight", "not_found_error")
        log.info("request %s cancelled over the control socket", request_id)
        return _json(CancelResult(request_id, True))

    async def post_drain(self, request: web.Request) -> web.Response:
        if self.daemon.state.phase not in ("ready", "draining"):
            return _error(409, f"cannot drain while {self.daemon.state.phase}", "conflict")
        self.daemon.drain()
        return _json(PhaseResult(self.daemon.state.phase, self.daemon.state.inflight_count), status=202)

    async def post_resume(self, request: web.Request) -> web.Response:
        if self.daemon.state.phase not in ("ready", "draining"):
            return _error(409, f"cannot resume while {self.daemon.state.phase}", "conflict")
        self.daemon.resume()
        return _json(PhaseResult(self.daemon.state.phase))

    async def post_reload(self, request: web.Request) -> web.Response:
        try:
            result = self.daemon.reload()
        except ConfigError as e:
            return _error(400, f"config not reloaded: {e}", "config_error")
        return _json(ReloadResult(**result))

    async def put_log_level(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, 'expected a JSON body {"level": "DEBUG"}', "invalid_request_error")
        level = body.get("level") if isinstance(body, dict) else None
        if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
            return _error(400, f"level: expected one of {', '.join(LOG_LEVELS)}, got {level!r}",
                          "invalid_request_error")
        self.daemon.set_log_level(level.upper())
        return _json(LogLevelResult(level.upper()))

    async def get_events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            while not self._stopping.is_set():
                await response.write(format_event("stats", self.status()) + format_event("requests", self.requests()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), EVENTS_INTERVAL_S)
        except ConnectionResetError:
            pass  # the reader went away
        return response
