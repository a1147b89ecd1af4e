"""The control socket: HTTP + JSON on a Unix socket (never TCP), for `llm-appliance ctl` and the
dashboard.

Routes: GET /status, GET /requests, POST /requests/{id}/cancel, POST /drain, POST /resume,
POST /reload, PUT /log-level, GET /events (SSE: one `stats` event a second, the /status body).
Errors are `{"error": {"message", "type"}}` with a 4xx/5xx status.

Who may connect is decided by the file system: the socket gets `ControlConfig.mode` (0660) and
`ControlConfig.group` when that group exists, inside the daemon's RuntimeDirectory.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import time
from collections import deque
from typing import Any, Protocol

from aiohttp import web

from appliance import __version__
from appliance.config import LOG_LEVELS, ControlConfig
from appliance.errors import ConfigError

log = logging.getLogger(__name__)

EVENTS_INTERVAL_S = 1.0
_RATE_WINDOW_S = 10.0  # tokens/s is averaged over this much history


class Controlled(Protocol):
    """What the control socket needs from the daemon (appliance.daemon.Daemon implements it)."""

    model_name: str | None
    state: Any  # appliance.server.state.ServiceState
    engine: Any  # appliance.engine.async_engine.AsyncEngine, None while loading
    http_address: str | None

    def engine_progressing(self) -> bool: ...
    def drain(self) -> None: ...
    def resume(self) -> None: ...
    def reload(self) -> dict[str, Any]: ...
    def set_log_level(self, level: str) -> None: ...


class _TokenRate:
    """Generation tokens per second over the last few seconds, from cumulative counters sampled
    once a second (so a single `ctl status` already sees a rate)."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()
        self.tokens_per_s = 0.0

    def update(self, total_tokens: int) -> None:
        now = time.monotonic()
        self._samples.append((now, total_tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] >= _RATE_WINDOW_S:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        self.tokens_per_s = (total_tokens - n0) / (now - t0) if now > t0 else 0.0


def _error(status: int, message: str, error_type: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": error_type}}, status=status)


class ControlServer:
    """The aiohttp app behind the socket. `start()` binds it, `stop()` unbinds and unlinks it."""

    def __init__(self, daemon: Controlled, config: ControlConfig) -> None:
        self.daemon = daemon
        self.config = config
        self._rate = _TokenRate()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._sampler: asyncio.Task[None] | None = None
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
        ])

    # ----- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        path = self.config.socket_path
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
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
        os.chmod(path, self.config.mode)
        self._chgrp(path)
        self._sampler = asyncio.create_task(self._sample_rate(), name="control-rate")
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

    async def _sample_rate(self) -> None:
        while True:
            engine = self.daemon.engine
            if engine is not None:
                self._rate.update(engine.stats().generation_tokens_total)
            await asyncio.sleep(EVENTS_INTERVAL_S)

    async def stop(self) -> None:
        self._stopping.set()
        if self._sampler is not None:
            self._sampler.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.socket_path)

    # ----- routes ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        daemon, state = self.daemon, self.daemon.state
        body: dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "model": daemon.model_name,
            "phase": state.phase,
            "uptime_s": round(time.monotonic() - state.started_monotonic, 3),
            "http_address": daemon.http_address,
            "log_level": logging.getLevelName(logging.getLogger().level),
            "inflight": state.inflight_count,
            "engine": None,
        }
        engine = daemon.engine
        if engine is not None:
            stats = engine.stats()
            body["engine"] = {
                "progressing": daemon.engine_progressing(),
                "dead": bool(engine.dead),
                "num_running": stats.num_running,
                "num_waiting": stats.num_waiting,
                "kv_cache_usage": stats.kv_cache_usage,
                "num_kv_blocks_total": stats.num_kv_blocks_total,
                "num_kv_blocks_used": stats.num_kv_blocks_used,
                "num_kv_blocks_cached": stats.num_kv_blocks_cached,
                "prefix_cache_hit_rate": stats.prefix_cache_hit_rate,
                "prefix_cache_queries": stats.prefix_cache_queries,
                "prefix_cache_hits": stats.prefix_cache_hits,
                "num_preemptions": stats.num_preemptions,
                "prompt_tokens_total": stats.prompt_tokens_total,
                "generation_tokens_total": stats.generation_tokens_total,
                "generation_tokens_per_s": round(self._rate.tokens_per_s, 3),
                "num_steps": stats.num_steps,
            }
        return body

    async def get_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def get_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.daemon.state.requests()})

    async def post_cancel(self, request: web.Request) -> web.Response:
        request_id = request.match_info["request_id"]
        if not await self.daemon.state.cancel(request_id):
            return _error(404, f"no request {request_id!r} in flight", "not_found_error")
        log.info("request %s cancelled over the control socket", request_id)
        return web.json_response({"request_id": request_id, "cancelled": True})

    async def post_drain(self, request: web.Request) -> web.Response:
        if self.daemon.state.phase not in ("ready", "draining"):
            return _error(409, f"cannot drain while {self.daemon.state.phase}", "conflict")
        self.daemon.drain()
        return web.json_response({"phase": self.daemon.state.phase, "inflight": self.daemon.state.inflight_count},
                                 status=202)

    async def post_resume(self, request: web.Request) -> web.Response:
        if self.daemon.state.phase not in ("ready", "draining"):
            return _error(409, f"cannot resume while {self.daemon.state.phase}", "conflict")
        self.daemon.resume()
        return web.json_response({"phase": self.daemon.state.phase})

    async def post_reload(self, request: web.Request) -> web.Response:
        try:
            result = self.daemon.reload()
        except ConfigError as e:
            return _error(400, f"config not reloaded: {e}", "config_error")
        return web.json_response(result)

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
        return web.json_response({"level": level.upper()})

    async def get_events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            while not self._stopping.is_set():
                data = json.dumps(self.status(), separators=(",", ":"))
                await response.write(f"event: stats\ndata: {data}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), EVENTS_INTERVAL_S)
        except ConnectionResetError:
            pass  # the reader went away
        return response
