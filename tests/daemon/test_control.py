"""Every control-socket command over the real Unix socket of a real daemon, and `ctl`'s output."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from appliance.config import EX_CONFIG
from appliance.ctl import EX_UNAVAILABLE, ControlClient, ControlError
from appliance.daemon import EX_SOFTWARE
from appliance.status import (
    LogLevelResult,
    PhaseResult,
    RateHistory,
    RequestList,
    StatusSnapshot,
    from_json,
    parse_event,
)

if TYPE_CHECKING:
    from conftest import DaemonProcess  # type: ignore[import-not-found]

CANARY = "zebra-canary-7731"


def ctl(daemon: DaemonProcess, *args: str, socket_path: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", "ctl", "--socket",
                           socket_path or daemon.control_socket, *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def client(daemon: DaemonProcess) -> ControlClient:
    return ControlClient(daemon.control_socket)


@pytest.fixture
def stalled_request(daemon: DaemonProcess, client: ControlClient) -> Any:
    """A chat request held in flight by the test-only stall hook; yields its control-socket row."""
    daemon.stall_file.touch()
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(daemon.chat(f"Remember {CANARY}.", 8)))
    worker.start()
    deadline = time.monotonic() + 30
    while not client.requests():
        assert time.monotonic() < deadline, "request never showed up in /requests"
        time.sleep(0.05)
    yield client.requests()[0], result
    if daemon.stall_file.exists():
        daemon.stall_file.unlink()
    worker.join(120)


def test_socket_is_a_0660_unix_socket(daemon: DaemonProcess) -> None:
    st = os.stat(daemon.control_socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_status(daemon: DaemonProcess, client: ControlClient) -> None:
    status = client.status()
    assert status.phase == "ready" and status.pid == daemon.proc.pid
    assert status.model == "SmolLM2-135M-Instruct"
    assert status.http_address and status.http_address.endswith(f":{daemon.port}")
    assert status.uptime_s > 0 and status.version
    assert status.config_path == str(daemon.config_file)
    engine = status.engine
    assert engine is not None and engine.progressing is True and engine.dead is False
    assert engine.num_kv_blocks_total > 0 and 0 <= engine.kv_cache_usage <= 1
    before = engine.generation_tokens_total
    assert daemon.chat().status_code == 200
    after = client.status()
    assert after.engine is not None and after.engine.generation_tokens_total > before
    # tokens/s comes from samples taken once a second: generate across a sample or two.
    deadline = time.monotonic() + 20
    while client.status().throughput.generation_tokens_per_s <= 0:
        assert time.monotonic() < deadline, "tokens/s stayed 0 while generating"
        time.sleep(1.1)
        assert daemon.chat().status_code == 200


def test_requests_lists_in_flight_without_text_then_cancel(
        daemon: DaemonProcess, client: ControlClient, stalled_request: Any) -> None:
    row, result = stalled_request
    assert row.client == "app" and row.prompt_tokens > 0 and row.age_s >= 0
    raw = client.request("GET", "/requests")
    assert CANARY not in json.dumps(raw)
    listing = ctl(daemon, "requests")
    assert listing.returncode == 0 and row.id in listing.stdout and "CLIENT" in listing.stdout
    assert ctl(daemon, "cancel", row.id).stdout.strip() == f"cancelled {row.id}"
    daemon.stall_file.unlink()
    deadline = time.monotonic() + 60
    while not result:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert result[0].status_code == 200 and result[0].json()["choices"][0]["finish_reason"] == "abort"
    assert client.requests() == []


def test_cancel_unknown_request(daemon: DaemonProcess, client: ControlClient) -> None:
    with pytest.raises(ControlError) as info:
        client.cancel("chatcmpl-nope")
    assert info.value.status == 404
    result = ctl(daemon, "cancel", "chatcmpl-nope")
    assert result.returncode == 1 and "no request 'chatcmpl-nope' in flight" in result.stderr


def test_drain_and_resume(daemon: DaemonProcess, client: ControlClient) -> None:
    assert client.drain() == PhaseResult("draining", 0)
    try:
        refused = daemon.chat()
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert client.status().phase == "draining"
    finally:
        out = ctl(daemon, "resume")
    assert out.returncode == 0 and out.stdout.strip() == "phase ready"
    assert daemon.chat().status_code == 200


def test_reload_reports_what_needs_a_restart(daemon: DaemonProcess, client: ControlClient) -> None:
    assert client.reload().needs_restart == []
    daemon.config_file.write_text(daemon.config_text.replace("max_model_len = 512", "max_model_len = 256"))
    try:
        out = ctl(daemon, "reload")
        assert out.returncode == 0
        assert out.stdout.splitlines() == ["reloaded: 1 client(s) (app)",
                                           "needs a restart to apply: engine.max_model_len"]
        daemon.config_file.write_text("[engine]\nmax_num_seqs = 0\n")
        with pytest.raises(ControlError) as info:
            client.reload()
        assert info.value.status == 400 and "engine.max_num_seqs: expected an integer >= 1" in str(info.value)
    finally:
        daemon.config_file.write_text(daemon.config_text)
    assert client.reload().needs_restart == []


def test_log_level(daemon: DaemonProcess, client: ControlClient) -> None:
    out = ctl(daemon, "log-level", "debug")
    assert out.returncode == 0 and out.stdout.strip() == "log level DEBUG"
    assert client.status().log_level == "DEBUG"
    with pytest.raises(ControlError) as info:
        client.request("PUT", "/log-level", {"level": "LOUD"})
    assert info.value.status == 400
    assert client.set_log_level("INFO") == LogLevelResult("INFO")


def test_ctl_status_text_and_json(daemon: DaemonProcess) -> None:
    text = ctl(daemon, "status")
    assert text.returncode == 0, text.stderr
    assert "  phase       ready" in text.stdout and "SmolLM2-135M-Instruct" in text.stdout
    assert "kv cache" in text.stdout and "tokens/s" in text.stdout
    # The stalls line: what held steps or streams (a CPU engine compiles nothing; no long GC here).
    assert "  stalls      0 kernel compiles while serving, garbage-collector pauses >= 50 ms: " in text.stdout
    as_json = json.loads(ctl(daemon, "--json", "status").stdout)
    assert as_json["phase"] == "ready"
    assert as_json["engine"]["kernel_compiles"] == 0 and as_json["engine"]["gc_long_pauses"] >= 0
    assert as_json["daemon_gc_long_pauses"] >= 0
    # Steps by how they ran: a CPU engine launches every step eagerly (the warm-up's included).
    paths = as_json["engine"]["steps_by_path"]
    assert set(paths) == {"decode_graph", "cascade_graph", "prefill_graph", "piecewise_graphs", "eager"}
    assert paths["eager"] > 0 and sum(paths.values()) == paths["eager"] <= as_json["engine"]["num_steps"]
    assert "eager" in text.stdout.split("  steps       ", 1)[1].split("\n", 1)[0]


def test_ctl_without_a_daemon(daemon: DaemonProcess) -> None:
    out = ctl(daemon, "status", socket_path=str(daemon.dir / "absent.sock"))
    assert out.returncode == EX_UNAVAILABLE and "no daemon" in out.stderr


async def test_events_stream_stats_and_requests_every_second(daemon: DaemonProcess) -> None:
    connector = aiohttp.UnixConnector(path=daemon.control_socket)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get("http://control/events") as response:
            assert response.status == 200 and response.content_type == "text/event-stream"
            events: list[Any] = []
            event = None
            async with asyncio.timeout(10):
                async for raw in response.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        event = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        assert event is not None
                        events.append(parse_event(event, line.removeprefix("data: ")))
                        if len(events) == 4:
                            break
    stats = [e for e in events if isinstance(e, StatusSnapshot)]
    assert [type(e) for e in events] == [StatusSnapshot, RequestList] * 2
    assert [e.phase for e in stats] == ["ready", "ready"]
    assert stats[1].uptime_s > stats[0].uptime_s


def test_history_has_a_throughput_figure_a_second(daemon: DaemonProcess, client: ControlClient) -> None:
    """GET /history: the figures /status showed over the last minutes, for a new dashboard."""
    assert daemon.chat().status_code == 200
    time.sleep(1.2)  # at least one sample after the request
    history = from_json(RateHistory, client.request("GET", "/history"))
    assert history.interval_s == 1.0
    n = len(history.generation_tokens_per_s)
    assert n >= 2 and len(history.prompt_tokens_per_s) == n and len(history.requests_per_s) == n
    assert max(history.generation_tokens_per_s) > 0 and max(history.requests_per_s) > 0


def test_a_second_daemon_on_the_same_socket_refuses_to_start(daemon: DaemonProcess, short_tmp: Any) -> None:
    """A live daemon keeps its socket: the second one says so and exits 78 (EX_CONFIG)."""
    second = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "serve", "--port", "0", "--model", "/nonexistent",
         "--control-socket", daemon.control_socket], capture_output=True, text=True, timeout=120)
    assert second.returncode == EX_CONFIG, second.stderr
    assert f"another daemon is running: it answers on the control socket {daemon.control_socket}" in second.stderr
    assert ControlClient(daemon.control_socket).status().pid == daemon.proc.pid


def test_a_daemon_starting_at_the_same_instant_is_refused_by_the_lock(short_tmp: Any) -> None:
    """The lock beside the socket closes the window between probing the path and binding it."""
    import fcntl

    path = str(short_tmp / "control.sock")
    with open(f"{path}.lock", "a") as held:  # what a daemon holds for its whole life
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run = subprocess.run(
            [sys.executable, "-m", "appliance.cli", "serve", "--port", "0", "--model", "/nonexistent",
             "--control-socket", path], capture_output=True, text=True, timeout=120)
    assert run.returncode == EX_CONFIG, run.stderr
    assert "another daemon is running" in run.stderr and not os.path.exists(path)


def test_a_stale_socket_file_is_replaced(short_tmp: Any) -> None:
    """A socket file nobody listens on (a daemon killed with SIGKILL) does not stop a start."""
    import socket as socketlib

    path = str(short_tmp / "stale.sock")
    stale = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nothing listens
    # /nonexistent fails the model load after the control socket is up: exit 78 for that reason.
    run = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "serve", "--port", "0", "--model", "/nonexistent",
         "--control-socket", path], capture_output=True, text=True, timeout=120)
    assert run.returncode == EX_CONFIG
    assert f"control socket on {path}" in run.stderr and "another daemon" not in run.stderr
    assert "cannot load the model" in run.stderr


def test_a_dead_engine_fails_its_request_and_exits_non_zero(daemon: DaemonProcess, client: ControlClient) -> None:
    """Last: it ends the module's daemon. systemd's Restart=on-failure restarts it from here."""
    daemon.fail_file.touch()  # test-only hook: the next engine step raises
    response = daemon.chat()
    assert response.status_code == 500
    assert daemon.proc.wait(60) == EX_SOFTWARE
    assert "engine died" in daemon.stderr()
    assert not os.path.exists(daemon.control_socket)


def test_latency_quantiles_interpolate_inside_histogram_buckets() -> None:
    """The control socket's p50/p99 come from /metrics histogram buckets (as histogram_quantile)."""
    from appliance.server.control_history import bucket_delta, quantile

    inf = float("inf")
    buckets = ((0.1, 0.0), (0.5, 50.0), (1.0, 100.0), (inf, 100.0))
    assert quantile(0.5, buckets) == 0.5
    assert quantile(0.99, buckets) == pytest.approx(0.99)
    assert quantile(0.5, ((1.0, 0.0), (inf, 10.0))) == 1.0  # beyond the last bound: that bound
    assert quantile(0.5, ((1.0, 0.0), (inf, 0.0))) is None and quantile(0.5, ()) is None
    # A window is a difference of cumulative counts: only what happened inside it.
    later = ((0.1, 5.0), (0.5, 55.0), (1.0, 105.0), (inf, 105.0))
    assert bucket_delta(later, buckets) == ((0.1, 5.0), (0.5, 5.0), (1.0, 5.0), (inf, 5.0))
