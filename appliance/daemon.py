"""`llm-appliance serve` and `llm-appliance config`: the appliance daemon.

Start-up, in order: read and validate the config once (exit 78 on any error), open the control
socket (phase "loading"), load and warm up the model (in the engine process, or on a worker
thread with engine.process = "inline") while telling systemd how far it got (STATUS=,
EXTEND_TIMEOUT_USEC=), start the engine client, bind the HTTP port, and only then READY=1.
While running: WATCHDOG=1 only while the engine makes progress, so systemd restarts a stuck
engine. Signals: SIGTERM/SIGINT drain then exit 0, SIGHUP reloads what can change live, SIGUSR1
reopens log files. A dead engine (its process killed, or a step raising) makes the daemon log
one line saying so and exit 70 (EX_SOFTWARE) at once; /health answers 503 until the port closes.

NOTE: torch and the engine are imported inside `Daemon.run`, so `config check/show` and
`--help` stay fast and never touch the GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import signal
import sys
import time
import tomllib
from typing import Any

from appliance.config import (
    EX_CONFIG,
    LOG_LEVELS,
    AppConfig,
    config_to_toml_dict,
    load_config,
)
from appliance.errors import ConfigError, ModelLoadError
from appliance.logs import reopen_log_files, setup_logging
from appliance.systemd_notify import SystemdNotifier, watchdog_interval_s

log = logging.getLogger("appliance.daemon")

EX_SOFTWARE = 70  # the engine died: systemd's Restart=on-failure brings us back

# Keys a SIGHUP applies without a restart; every other change is reported as needing one.
_LIVE_KEYS = {"clients", "logging.level"}


# ----- command line ---------------------------------------------------------------------------


def add_arguments_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: none, built-in defaults)")
    parser.add_argument("--host", help="address of the HTTP API (server.host)")
    parser.add_argument("--port", type=int, help="port of the HTTP API; 0 picks a free one (server.port)")
    parser.add_argument("--model", metavar="PATH|default", help="model directory, .gguf file or 'default'")
    parser.add_argument("--served-model-name", help="the name clients pass as 'model'")
    parser.add_argument("--api-key", metavar="KEY", help="require this key (replaces [[clients]])")
    parser.add_argument("--control-socket", metavar="PATH", help="control socket path (control.socket_path)")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, help="logging.level")
    parser.add_argument("--request-log", metavar="FILE", help="JSON-lines request log (logging.request_log_path)")
    parser.add_argument("--max-model-len", type=int, help="engine.max_model_len")
    parser.add_argument("--max-num-seqs", type=int, help="engine.max_num_seqs")
    parser.add_argument("--dtype", help="model.dtype")
    parser.add_argument("--device", help="model.device")
    parser.add_argument("--drain-timeout", type=float, metavar="SECONDS", help="server.drain_timeout_s")
    _add_set_argument(parser)


def _add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any key, e.g. --set engine.block_size=32 (value in TOML syntax; "
                             "bare words are strings)")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Flags -> dotted keys for `load_config` (None: flag not given)."""
    get = lambda name: getattr(args, name, None)  # noqa: E731 - config/serve share this
    overrides: dict[str, Any] = {
        "server.host": get("host"),
        "server.port": get("port"),
        "model.model": get("model"),
        "model.served_model_name": get("served_model_name"),
        "control.socket_path": get("control_socket"),
        "logging.level": get("log_level"),
        "logging.request_log_path": get("request_log"),
        "engine.max_model_len": get("max_model_len"),
        "engine.max_num_seqs": get("max_num_seqs"),
        "model.dtype": get("dtype"),
        "model.device": get("device"),
        "server.drain_timeout_s": get("drain_timeout"),
    }
    if get("api_key"):
        overrides["clients"] = [{"name": "default", "api_key": args.api_key}]
    for item in get("set") or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"command line: --set {item!r}: expected KEY=VALUE, e.g. engine.block_size=32")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word: a string
        overrides[key.strip()] = value
    return overrides


def run_serve(args: argparse.Namespace) -> int:
    setup_logging(getattr(args, "log_level", None) or "INFO")
    try:
        config = load_config(args.config, overrides_from_args(args))
    except ConfigError as e:
        print(f"llm-appliance: config error: {e}", file=sys.stderr)
        return EX_CONFIG
    daemon = Daemon(config, config_path=args.config, overrides=overrides_from_args(args))
    status = asyncio.run(daemon.run())
    if status == EX_SOFTWARE:
        # The engine died: exit now. The interpreter's own teardown (garbage-collecting every
        # object of torch, transformers and the app) takes seconds, and a minute on a crowded
        # machine; nothing of it matters once the engine process is gone and the logs are flushed.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(status)
    return status


def add_arguments_config(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate a config file (exit 78 when it is wrong)")
    check.add_argument("file", metavar="FILE")
    show = sub.add_parser("show", help="print the effective config as TOML, secrets masked")
    show.add_argument("--config", metavar="FILE", help="config file (default: none, built-in defaults)")
    show.add_argument("--show-secrets", action="store_true", help="print API keys instead of a mask")
    _add_set_argument(show)


def run_config(args: argparse.Namespace) -> int:
    import tomli_w

    path = args.file if args.action == "check" else args.config
    try:
        config = load_config(path, overrides_from_args(args))
    except ConfigError as e:
        print(f"llm-appliance: config error: {e}", file=sys.stderr)
        return EX_CONFIG
    if args.action == "check":
        print(f"{path}: OK ({len(config.clients)} client(s), model {config.engine.model.model!r})")
    else:
        print(tomli_w.dumps(config_to_toml_dict(config, mask_secrets=not args.show_secrets)), end="")
    return 0


# ----- the daemon -----------------------------------------------------------------------------


def _flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Daemon:
    """One run of the appliance. Implements `appliance.server.control.Controlled`."""

    def __init__(self, config: AppConfig, *, config_path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        from appliance.server.state import ServiceState

        self.config = config
        self.config_path = config_path
        self.overrides = overrides or {}
        self.notifier = SystemdNotifier()
        self.state = ServiceState(stall_timeout_s=config.server.stall_timeout_s)
        self.state.set_server_limits(config.server)
        self.state.set_clients(config.clients)
        self.engine: Any = None  # AsyncEngine once loaded
        self.model_name: str | None = None
        self.http_address: str | None = None
        self._app: Any = None  # the aiohttp app, once serving
        self._stop = asyncio.Event()
        self._exit_status = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._stall_reported = False

    # ----- Controlled (the control socket calls these) ----------------------------------------

    def engine_progressing(self) -> bool:
        return self.engine is not None and self.engine.is_progressing(self.config.server.stall_timeout_s)

    def server_metrics(self) -> Any:
        """The HTTP app's ServerMetrics (None until it serves): counters for the control socket."""
        from appliance.server.context import METRICS_KEY

        return self._app[METRICS_KEY] if self._app is not None else None

    def drain(self) -> None:
        """Stop admitting new requests (503); in-flight ones finish. `resume()` undoes it."""
        if self.state.phase == "ready":
            log.info("draining: new requests get 503 until resumed")
            self.state.begin_drain()
            self._status()

    def resume(self) -> None:
        if self.state.phase == "draining":
            log.info("resumed: admitting requests again")
            self.state.resume()
            self._status()

    def set_log_level(self, level: str) -> None:
        logging.getLogger().setLevel(level)
        log.warning("log level set to %s", level)

    def reload(self) -> dict[str, Any]:
        """Re-read the config file (SIGHUP, POST /reload). Applies client keys and quotas and the
        log level; reports other changes as needing a restart. Raises ConfigError (nothing applied)."""
        new = load_config(self.config_path, self.overrides)
        old_keys = _flatten(config_to_toml_dict(self.config, mask_secrets=False))
        new_keys = _flatten(config_to_toml_dict(new, mask_secrets=False))
        changed = sorted(k for k in old_keys.keys() | new_keys.keys()
                         if old_keys.get(k) != new_keys.get(k) and k not in ("clients", "source_path"))
        needs_restart = [k for k in changed if k not in _LIVE_KEYS]
        self.state.set_clients(new.clients)
        if new.logging.level != self.config.logging.level:
            self.set_log_level(new.logging.level)
        self.config = dataclasses.replace(
            self.config, clients=new.clients,
            logging=dataclasses.replace(self.config.logging, level=new.logging.level))
        log.info("reloaded %s: %d client(s), log level %s", self.config_path or "(no file)",
                 len(new.clients), new.logging.level)
        if needs_restart:
            log.warning("changed but only applied after a restart: %s", ", ".join(needs_restart))
        return {"applied": ["clients", "logging.level"], "clients": [c.name for c in new.clients],
                "needs_restart": needs_restart}

    # ----- lifecycle --------------------------------------------------------------------------

    async def run(self) -> int:
        from appliance.fleet.agent_check import start_agent_check
        from appliance.server.control import ControlServer, ControlSocketInUseError

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_sigterm)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGUSR1, self._on_sigusr1)
        setup_logging(self.config.logging.level)

        control = ControlServer(self, self.config.control)
        try:
            await control.start()
        except ControlSocketInUseError as e:
            # Not fixed by restarting (EX_CONFIG stops systemd's loop); the other daemon keeps its socket.
            log.critical("refusing to start: %s", e)
            self.notifier.close()
            return EX_CONFIG
        except OSError as e:
            # Run by hand as a user, /run/llm-appliance is not writable: serve without it.
            log.warning("no control socket at %s: %s", self.config.control.socket_path, e)
            control = None
        self._tasks.append(asyncio.create_task(self._watchdog(), name="watchdog"))
        fleet_agent = await start_agent_check(self, self.config)  # [fleet]: HAProxy asks it for our state
        runner = None
        try:
            runner = await self._start()
            if runner is not None:
                await self._stop.wait()
        except ModelLoadError as e:
            # A missing or corrupt model is not fixed by restarting: EX_CONFIG stops systemd's loop.
            log.critical("cannot load the model: %s", e)
            self._exit_status = EX_CONFIG
        except Exception:
            log.critical("start-up failed", exc_info=True)
            self._exit_status = 1
        finally:
            self.notifier.notify(STOPPING=1, STATUS="stopping")
            self.state.set_phase("stopping")
            if runner is not None:
                await runner.cleanup()
            if self.engine is not None:
                await self.engine.shutdown()
            if fleet_agent is not None:
                await fleet_agent.stop()
            if control is not None:
                await control.stop()
            for task in self._tasks:
                task.cancel()
            self.notifier.close()
        log.info("exiting with status %d", self._exit_status)
        return self._exit_status

    async def _start(self) -> Any:
        """Load, warm up, serve. Returns the HTTP runner, or None when the stop came first."""
        from appliance.engine.async_engine import AsyncEngine
        from appliance.engine.core_client import make_client, resolve_process_mode
        from appliance.gc_watch import watch_gc_pauses
        from appliance.server.app import make_app, start_site

        server = self.config.server
        load_timeout_us = int(server.load_timeout_s * 1e6)
        model = self.config.engine.model.model
        self.notifier.notify(STATUS=f"loading model {model}", EXTEND_TIMEOUT_USEC=load_timeout_us)
        mode = resolve_process_mode(self.config.engine)
        log.info("loading model %s (engine %s)", model, "in its own process" if mode == "separate" else "inline")
        t0 = time.monotonic()
        load = asyncio.create_task(make_client(
            dataclasses.replace(self.config.engine, process=mode), on_progress=self._loading_status,
            load_timeout_s=server.load_timeout_s))
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({load, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not load.done():
            # SIGTERM while loading: the load thread cannot be interrupted; exit without it.
            log.warning("stopped while loading the model")
            stop.cancel()
            return None
        stop.cancel()
        client = load.result()  # a load failure raises here: exit non-zero, systemd retries
        self.engine = AsyncEngine(client)
        self.model_name = self.engine.model_name
        await self.engine.start()
        self.state.attach_engine(self.engine)
        self._tasks.append(asyncio.create_task(self._watch_engine(), name="engine-death"))

        self._app = make_app(self.config, self.engine, self.state)
        runner, port = await start_site(self._app, server.host, server.port)
        # What exists now (modules, the tokenizer, the app) lives as long as the daemon: out of the
        # cyclic GC's view, the collections that streaming's per-step objects trigger walk only
        # what came after (they cost the HTTP side ~1 us per event otherwise; engine/llm_engine.py
        # does the same in the engine's process).
        gc.collect()
        gc.freeze()
        watch_gc_pauses("daemon")  # a long collection stalls every stream: logged
        self.http_address = f"{server.host}:{port}"
        self.state.set_phase("ready")
        log.info("serving %s on http://%s (loaded and warmed up in %.1f s)",
                 self.model_name, self.http_address, time.monotonic() - t0)
        self.notifier.notify(READY=1, STATUS=self._status_line(), MAINPID=os.getpid())
        return runner

    def _loading_status(self, status: str) -> None:
        """From the loader (a worker thread): the model is loaded, warm-up begins."""
        self.notifier.notify(STATUS=status, EXTEND_TIMEOUT_USEC=int(self.config.server.load_timeout_s * 1e6))

    def _status_line(self) -> str:
        phase = self.state.phase
        if phase == "ready":
            return f"serving {self.model_name} on {self.http_address}"
        if phase == "draining":
            return f"draining {self.state.inflight_count} request(s) on {self.http_address}"
        return phase

    def _status(self) -> None:
        self.notifier.notify(STATUS=self._status_line())

    async def _watchdog(self) -> None:
        """WATCHDOG=1 every half WatchdogSec: always while loading (TimeoutStartSec and
        EXTEND_TIMEOUT_USEC bound that), afterwards only while the engine makes progress."""
        interval_s = watchdog_interval_s()
        if interval_s is None:
            return
        while True:
            if self.engine is None or self.engine_progressing():
                if self._stall_reported:
                    log.warning("engine progressing again; watchdog pings resumed")
                    self._stall_reported = False
                self.notifier.notify(WATCHDOG=1)
            elif not self._stall_reported:
                log.error("engine made no progress for %.0f s: withholding watchdog pings",
                          self.config.server.stall_timeout_s)
                self.notifier.notify(STATUS="engine stalled")
                self._stall_reported = True
            await asyncio.sleep(interval_s)

    async def _watch_engine(self) -> None:
        error = await self.engine.wait_dead()
        log.critical("engine died: %s; exiting %d", error, EX_SOFTWARE)
        self._exit_status = EX_SOFTWARE
        self._stop.set()

    # ----- signals ----------------------------------------------------------------------------

    def _on_sigterm(self) -> None:
        if self.state.phase in ("ready", "draining") and not any(t.get_name() == "shutdown" for t in self._tasks):
            self._tasks.append(asyncio.create_task(self._drain_and_stop(), name="shutdown"))
        elif self.state.phase == "loading":
            self._stop.set()

    async def _drain_and_stop(self) -> None:
        timeout_s = self.config.server.drain_timeout_s
        self.state.begin_drain()
        inflight = self.state.inflight_count
        log.info("SIGTERM: draining %d in-flight request(s), up to %.0f s", inflight, timeout_s)
        self.notifier.notify(STOPPING=1, STATUS=f"draining {inflight} request(s)")
        if not await self.state.wait_idle(timeout_s):
            left = self.state.requests()
            log.warning("drain deadline passed: aborting %d request(s)", len(left))
            for request in left:
                await self.state.cancel(request["id"])
            await self.state.wait_idle(5.0)
        self._stop.set()

    def _on_sighup(self) -> None:
        try:
            self.reload()
        except ConfigError as e:
            log.error("SIGHUP: config not reloaded, keeping the running one: %s", e)

    def _on_sigusr1(self) -> None:
        from appliance.server.context import REQUEST_LOG_KEY

        reopened = reopen_log_files()
        if self._app is not None and REQUEST_LOG_KEY in self._app:
            self._app[REQUEST_LOG_KEY].reopen()
            reopened += 1
        log.info("SIGUSR1: reopened %d log file(s)", reopened)
