"""`DashboardApp`: the operator's screen. Data comes from a `DaemonSource` (the control socket)
and a GPU sampler (NVML), both injected, so tests can feed recorded snapshots.

Reactive state lives on the app (`status`, `requests`, `gpus`, `connection`) and is bound to the
widgets; two workers fill it: `follow_daemon` (the /events stream, reconnecting with back-off)
and `sample_gpus` (a thread, once a second: NVML calls block). Actions run as workers too, and a
daemon error becomes a notification, never a crash.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol, TypeVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.widgets import Footer

from appliance.ctl import ControlError
from appliance.dashboard.client import DaemonSource
from appliance.dashboard.format import socket_error
from appliance.dashboard.widgets.banner import CONNECTING, Banner, Connection
from appliance.dashboard.widgets.clients_table import ClientsTable
from appliance.dashboard.widgets.confirm_screen import ConfirmScreen
from appliance.dashboard.widgets.daemon_bar import DaemonBar
from appliance.dashboard.widgets.gpu_panel import GpuPanel
from appliance.dashboard.widgets.help_screen import HelpScreen
from appliance.dashboard.widgets.kv_cache import KvCachePanel
from appliance.dashboard.widgets.latency import LatencyPanel
from appliance.dashboard.widgets.log_level_screen import LogLevelScreen
from appliance.dashboard.widgets.queue import QueuePanel
from appliance.dashboard.widgets.requests_table import RequestsTable
from appliance.dashboard.widgets.throughput import ThroughputPanel
from appliance.status import GpuSnapshot, RequestRow, StatusSnapshot, WireError

T = TypeVar("T")

GPU_INTERVAL_S = 1.0
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 5.0


class GpuSampler(Protocol):
    def sample(self) -> GpuSnapshot: ...  # blocking; called on a worker thread
    def close(self) -> None: ...


def reason(error: BaseException, socket_path: str) -> str:
    """Why the daemon could not be read, for the banner."""
    if isinstance(error, (FileNotFoundError, ConnectionRefusedError, PermissionError)):
        return socket_error(socket_path, error)
    if isinstance(error, WireError):
        return f"unexpected answer (a daemon of another version?): {error}"
    return str(error) or type(error).__name__


class DashboardApp(App[None]):
    TITLE = "llm-appliance"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    # Narrow (80x24): everything stacked, GPU cards of three lines, clients under the requests.
    # Wide: GPU cards two by two, requests and clients side by side, taller panels.
    CSS = """
    #stats { height: 6; }
    #stats > StatusPanel { width: 1fr; }
    #bottom { height: 1fr; min-height: 5; layout: vertical; }
    #bottom > RequestsTable { height: 1fr; }
    #bottom > ClientsTable { height: auto; max-height: 5; }
    GpuPanel { max-height: 5; }
    Screen.-wide #stats { height: 8; }
    Screen.-wide #bottom { layout: horizontal; }
    Screen.-wide #bottom > RequestsTable { width: 3fr; }
    Screen.-wide #bottom > ClientsTable { width: 2fr; height: 1fr; max-height: 100%; }
    Screen.-wide GpuPanel { grid-size: 2; max-height: 18; }
    """
    BINDINGS = [
        Binding("d", "drain", "Drain"),
        Binding("r", "resume", "Resume"),
        Binding("c", "cancel_request", "Cancel req"),
        Binding("R", "reload", "Reload cfg"),
        Binding("l", "log_level", "Log level"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
    ]
    KEY_HELP = [
        ("d", "drain: stop admitting requests (new ones get 503); those in flight finish (asks first)"),
        ("r", "resume: admit requests again after a drain (asks first)"),
        ("c", "cancel the request selected in the table (↑/↓ select); its client gets finish_reason abort"),
        ("R", "reload the daemon's config file: client keys, quotas, log level"),
        ("l", "change the daemon's log level (until it restarts)"),
        ("?", "this help"),
        ("q / ctrl+q", "quit the dashboard (the daemon keeps running)"),
    ]

    status: reactive[StatusSnapshot | None] = reactive(None)
    requests: reactive[list[RequestRow] | None] = reactive(None)
    gpus: reactive[GpuSnapshot | None] = reactive(None)
    connection: reactive[Connection] = reactive(CONNECTING)

    def __init__(self, source: DaemonSource, gpu_sampler: GpuSampler, *,
                 gpu_interval_s: float = GPU_INTERVAL_S) -> None:
        super().__init__()
        self.source = source
        self.gpu_sampler = gpu_sampler
        self.gpu_interval_s = gpu_interval_s
        self._gpu_sampling = False

    def compose(self) -> ComposeResult:
        yield DaemonBar(self.source.description).data_bind(DashboardApp.status)
        yield Banner().data_bind(DashboardApp.connection)
        with Horizontal(id="stats"):
            yield ThroughputPanel().data_bind(DashboardApp.status)
            yield LatencyPanel().data_bind(DashboardApp.status)
            yield KvCachePanel().data_bind(DashboardApp.status)
            yield QueuePanel().data_bind(DashboardApp.status)
        yield GpuPanel().data_bind(DashboardApp.gpus)
        with Horizontal(id="bottom"):
            yield RequestsTable().data_bind(DashboardApp.requests)
            yield ClientsTable().data_bind(DashboardApp.status)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(RequestsTable).focus()
        self.follow_daemon()
        self.sample_gpus()
        self.set_interval(self.gpu_interval_s, self.sample_gpus)

    async def on_unmount(self) -> None:
        await self.source.close()
        await asyncio.to_thread(self.gpu_sampler.close)

    # ----- data ------------------------------------------------------------------------------

    @work(exclusive=True, group="daemon")
    async def follow_daemon(self) -> None:
        """/status and /requests once, then the /events stream; on any failure the banner says
        why, and the next try comes after a back-off (0.5 s doubling to 5 s)."""
        delay_s = BACKOFF_MIN_S
        attempt = 0
        while True:
            try:
                self.status = await self.source.status()
                self.requests = await self.source.requests()
                await self._seed_sparklines()
                self.connection = Connection(True)
                delay_s, attempt = BACKOFF_MIN_S, 0
                async for event in self.source.events():
                    if isinstance(event, StatusSnapshot):
                        self.status = event
                    else:
                        self.requests = event.requests
                raise ConnectionResetError("the event stream ended")
            except (OSError, ControlError, WireError) as e:
                attempt += 1
                self.status = None
                self.requests = None
                self.connection = Connection(False, reason(e, self.source.description), delay_s, attempt)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, BACKOFF_MAX_S)

    async def _seed_sparklines(self) -> None:
        try:
            history = await self.source.history()
        except ControlError:
            return  # a daemon without /history (older): the sparklines fill as events come
        self.query_one(ThroughputPanel).seed(history)

    def sample_gpus(self) -> None:
        if not self._gpu_sampling:  # a slow NVML call never piles up threads
            self._gpu_sampling = True
            self._sample_gpus_thread()

    @work(thread=True, group="gpu")
    def _sample_gpus_thread(self) -> None:
        try:
            snapshot = self.gpu_sampler.sample()
        finally:
            self._gpu_sampling = False
        self.call_from_thread(setattr, self, "gpus", snapshot)

    async def refresh_now(self) -> None:
        """After an action: show its effect without waiting for the next event."""
        try:
            self.status = await self.source.status()
            self.requests = await self.source.requests()
        except (OSError, ControlError, WireError):
            pass  # follow_daemon notices and shows the banner

    # ----- actions ---------------------------------------------------------------------------

    async def _act(self, what: str, call: Awaitable[T]) -> T | None:
        """Await one control call; its error becomes a notification (None)."""
        try:
            result = await call
        except ControlError as e:
            self.notify(str(e), title=f"{what}: the daemon refused", severity="error", timeout=8)
            return None
        except WireError as e:
            self.notify(str(e), title=f"{what}: unexpected answer", severity="error", timeout=8)
            return None
        except OSError as e:
            self.notify(reason(e, self.source.description), title=f"{what}: daemon unreachable",
                        severity="error", timeout=8)
            return None
        await self.refresh_now()
        return result

    @work(group="actions")
    async def action_drain(self) -> None:
        question = ("Drain the daemon? New requests get 503 until you resume; "
                    "requests in flight finish.")
        if await self.push_screen_wait(ConfirmScreen(question)):
            result = await self._act("drain", self.source.drain())
            if result is not None:
                self.notify(f"draining: {result.inflight} request(s) in flight", title="drain")

    @work(group="actions")
    async def action_resume(self) -> None:
        if await self.push_screen_wait(ConfirmScreen("Resume admitting requests?")):
            result = await self._act("resume", self.source.resume())
            if result is not None:
                self.notify(f"phase {result.phase}", title="resume")

    @work(group="actions")
    async def action_cancel_request(self) -> None:
        request_id = self.query_one(RequestsTable).selected_request_id
        if request_id is None:
            self.notify("no request selected (the table is empty)", severity="warning")
            return
        if await self._act("cancel", self.source.cancel(request_id)) is not None:
            self.notify(f"cancelled {request_id}", title="cancel")

    @work(group="actions")
    async def action_reload(self) -> None:
        result = await self._act("reload", self.source.reload())
        if result is not None:
            text = f"{len(result.clients)} client(s): {', '.join(result.clients) or 'API open'}"
            if result.needs_restart:
                text += "\nneeds a restart: " + ", ".join(result.needs_restart)
            self.notify(text, title="config reloaded",
                        severity="warning" if result.needs_restart else "information")

    @work(group="actions")
    async def action_log_level(self) -> None:
        current = self.status.log_level if self.status is not None else None
        level = await self.push_screen_wait(LogLevelScreen(current))
        if level is not None and await self._act("log level", self.source.set_log_level(level)) is not None:
            self.notify(f"daemon log level {level}", title="log level")

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.KEY_HELP))
