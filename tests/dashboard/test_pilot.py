"""The dashboard as an operator uses it, against a real daemon (default model, CPU) over its real
control socket: live figures while requests run, cancel from the table, drain and resume, and a
daemon that goes away and comes back."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from conftest import until
from harness import CONFIG, Load, start_daemon
from screen_text import screen_text

from appliance.ctl import ControlClient
from appliance.dashboard import format as fmt
from appliance.dashboard.app import DashboardApp
from appliance.dashboard.client import ControlSocketClient
from appliance.dashboard.nvml import NvmlSampler
from appliance.dashboard.widgets.requests_table import RequestsTable
from appliance.dashboard.widgets.throughput import ThroughputPanel


def flat(text: str) -> str:
    """Screen text with runs of white space as one space (banner lines wrap)."""
    return " ".join(text.split())


def make_app(daemon: Any) -> DashboardApp:
    return DashboardApp(ControlSocketClient(daemon.control_socket), NvmlSampler())


async def test_panels_fill_with_live_figures_as_requests_run(daemon: Any) -> None:
    app = make_app(daemon)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: app.connection.connected, "connected (/status, /requests, /history read)")
        text = screen_text(app)
        assert "● READY" in text and "SmolLM2-135M-Instruct" in text and "DISCONNECTED" not in text
        assert "no NVIDIA GPU" in text  # this machine has none: the real NVML error path
        # The sparklines start from the daemon's /history, not empty.
        assert len(app.query_one(ThroughputPanel).generation_history) > 1
        before = app.status.engine.generation_tokens_total  # type: ignore[union-attr]
        # Four streams: two as "batch", whose quota is one request at a time, so 429s happen.
        with Load(daemon, streams=4, max_tokens=16) as load:
            await until(pilot, lambda: bool(app.requests), "a request in the table")
            await until(pilot, lambda: app.status is not None and app.status.throughput.generation_tokens_per_s > 0,
                        "generated tokens/s above zero", timeout_s=120)
            # The wide table shows whole ids: the daemon's requests are on screen.
            await until(pilot, lambda: any(r.id in screen_text(app) for r in app.requests or []),
                        "a request id on screen")
            await until(pilot, lambda: app.status is not None and app.status.queue.rejected_total > 0,
                        "the batch client's 429s", timeout_s=120)
        assert 200 in load.statuses and 429 in load.statuses

        def latency_on_screen() -> bool:
            status = app.status
            if status is None or status.latency.ttft_p50_s is None:
                return False
            text = screen_text(app)
            return (f"TTFT {fmt.seconds(status.latency.ttft_p50_s)}" in " ".join(text.split())
                    and f"429s {status.queue.rejected_total} " in " ".join(text.split()))

        await until(pilot, latency_on_screen, "TTFT p50 and the 429 count on screen", timeout_s=120)
        status = app.status
        assert status is not None and status.engine is not None
        assert status.engine.generation_tokens_total > before
        batch = next(c for c in status.clients if c.name == "batch")
        assert batch.rejected_total > 0 and batch.max_concurrent_requests == 1


async def test_cancel_from_the_table_ends_the_request_in_the_daemon(daemon: Any) -> None:
    daemon.stall_file.touch()  # test-only hook: engine steps wait, so the request stays in flight
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(daemon.chat("Count to fifty.", 32)))
    worker.start()
    try:
        app = make_app(daemon)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: bool(app.requests), "the stalled request in the table")
            (row,) = app.requests or []
            table = app.query_one(RequestsTable)
            assert table.selected_request_id == row.id
            await pilot.press("c")
            await until(pilot, lambda: any(f"cancelled {row.id}" in str(n.message) for n in app._notifications),
                        "the daemon's answer as a notification")
            # The abort is applied between engine steps: let the stalled engine step again.
            daemon.stall_file.unlink()
            await until(pilot, lambda: not ControlClient(daemon.control_socket).requests(),
                        "the request gone from the daemon")
            await until(pilot, lambda: not app.requests, "the table emptied")
    finally:
        daemon.stall_file.unlink(missing_ok=True)
        worker.join(120)
    assert result and result[0].status_code == 200
    assert result[0].json()["choices"][0]["finish_reason"] == "abort"


async def test_cancel_with_nothing_selected_says_so(daemon: Any) -> None:
    app = make_app(daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.status is not None, "the first /status")
        await pilot.press("c")
        await until(pilot, lambda: any("no request selected" in str(n.message) for n in app._notifications),
                    "a warning notification")


async def test_drain_and_resume_change_the_daemon_phase(daemon: Any) -> None:
    client = ControlClient(daemon.control_socket)
    app = make_app(daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.status is not None, "the first /status")
        await pilot.press("d")
        await pilot.pause()
        assert client.status().phase == "ready"  # nothing happens before the answer
        await pilot.press("y")
        await until(pilot, lambda: app.status is not None and app.status.phase == "draining", "phase draining")
        assert client.status().phase == "draining"
        assert "● DRAINING" in screen_text(app)
        refused = await asyncio.to_thread(daemon.chat)
        assert refused.status_code == 503
        await pilot.press("r")
        await pilot.pause()
        await pilot.press("n")  # declined: still draining
        await pilot.pause(0.5)
        assert client.status().phase == "draining"
        await pilot.press("r")
        await pilot.pause()
        await pilot.press("y")
        await until(pilot, lambda: app.status is not None and app.status.phase == "ready", "phase ready")
        assert client.status().phase == "ready"


async def test_a_daemon_error_is_a_notification(daemon: Any) -> None:
    """Resume while ready is no error; a bad config on reload is: the daemon's 400 shows up as a
    notification and the dashboard carries on."""
    app = make_app(daemon)
    daemon.config_file.write_text("[engine]\nmax_num_seqs = 0\n")
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.status is not None, "the first /status")
            await pilot.press("R")
            await until(pilot, lambda: any("engine.max_num_seqs" in str(n.message) for n in app._notifications),
                        "the daemon's refusal as a notification")
            assert app.is_running and app.connection.connected
    finally:
        daemon.config_file.write_text(daemon.config_text)


async def test_log_level_from_the_picker(daemon: Any) -> None:
    client = ControlClient(daemon.control_socket)
    app = make_app(daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.status is not None, "the first /status")
        await pilot.press("l")
        await pilot.pause()
        await pilot.press("up", "enter")  # the picker opens on INFO; DEBUG is above it
        await until(pilot, lambda: client.status().log_level == "DEBUG", "log level DEBUG")
        client.set_log_level("INFO")


async def test_help_screen_lists_every_key(daemon: Any) -> None:
    app = make_app(daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        text = screen_text(app)
        for phrase in ("drain:", "resume:", "cancel the request", "reload the daemon", "log level", "quit"):
            assert phrase in text, phrase
        await pilot.press("escape")
        await pilot.pause()
        assert "drain:" not in screen_text(app)


async def test_killing_the_daemon_shows_disconnected_and_a_restart_reconnects(daemon: Any) -> None:
    """Last in the module: it kills the module's daemon and starts another on the same socket."""
    app = make_app(daemon)
    workdir = Path(tempfile.mkdtemp(prefix="llmd-", dir="/tmp"))
    second = None
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.connection.connected, "connected")
            first_pid = app.status.pid  # type: ignore[union-attr]
            daemon.proc.kill()  # SIGKILL: no goodbye, the socket file stays behind
            await asyncio.to_thread(daemon.proc.wait, 30)
            await until(pilot, lambda: not app.connection.connected, "the disconnected state")
            # The first failure is the stream breaking; the retries find a socket nobody listens on.
            await until(pilot, lambda: "no daemon listens on" in flat(screen_text(app)), "the stale-socket banner")
            text = flat(screen_text(app))
            assert "● DISCONNECTED" in text and "DAEMON UNREACHABLE" in text
            assert app.status is None
            second = await asyncio.to_thread(
                start_daemon, workdir, ["--control-socket", daemon.control_socket], CONFIG)
            await until(pilot, lambda: app.connection.connected and app.status is not None
                        and app.status.phase == "ready", "reconnected to the restarted daemon", timeout_s=60)
            assert app.status is not None and app.status.pid != first_pid
            assert "DAEMON UNREACHABLE" not in screen_text(app)
    finally:
        if second is not None:
            second.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        time.sleep(0)
