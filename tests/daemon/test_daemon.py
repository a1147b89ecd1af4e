"""The daemon as systemd sees it: a real `llm-appliance serve` process, a real NOTIFY_SOCKET.

NOTE: the tests share one daemon per engine client (engine.process "inline" and "separate": the
module's `daemon` fixture is parametrized) and run in file order; the last one sends SIGTERM.
Each leaves the daemon ready, as it found it. The engine-process kill test starts its own.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pytest

from appliance.daemon import EX_SOFTWARE

from .conftest import start_daemon

if TYPE_CHECKING:
    from conftest import DaemonProcess  # type: ignore[import-not-found]

OLD_KEY, NEW_KEY = "sk-old-key", "sk-new-key"


@pytest.fixture(scope="module", params=["inline", "separate"])
def daemon(request) -> Iterator[DaemonProcess]:
    """One daemon per engine client, shared by this module's tests."""
    workdir = Path(tempfile.mkdtemp(prefix="llma-", dir="/tmp"))
    d = start_daemon(workdir, ["--set", f"engine.process={request.param}"])
    yield d
    d.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def current_key(daemon: DaemonProcess) -> str:
    return daemon.key_file.read_text().strip()


def test_startup_status_then_ready_after_the_port_answers(daemon: DaemonProcess) -> None:
    messages = daemon.notify.messages
    ready = messages[daemon.ready_index].split("\n")
    before = messages[:daemon.ready_index]
    # Progress while loading, with the start timeout extended for the load.
    assert any(m.startswith("STATUS=loading model default") and "EXTEND_TIMEOUT_USEC=600000000" in m
               for m in before), before
    assert any("STATUS=warming up" in m for m in before), before
    assert not any("READY=1" in m for m in before)
    assert f"MAINPID={daemon.proc.pid}" in ready
    # READY=1 went out only after the port was bound: it answers at once.
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5):
        pass
    health = daemon.http("GET", "/health", key=None)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_watchdog_pings_while_healthy(daemon: DaemonProcess) -> None:
    start = len(daemon.notify.messages)
    for _ in range(3):
        start = daemon.notify.wait_for(lambda m: m == "WATCHDOG=1", 10, start) + 1


def test_no_watchdog_while_the_engine_loop_is_stalled(daemon: DaemonProcess) -> None:
    daemon.stall_file.touch()  # test-only hook: engine steps block while this file exists
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(daemon.chat()))
    try:
        worker.start()
        stalled = daemon.notify.wait_for(lambda m: m == "STATUS=engine stalled", daemon.stall_timeout_s + 30,
                                         len(daemon.notify.messages))
        health = daemon.http("GET", "/health", key=None)
        assert health.status_code == 503 and health.json()["engine"] == "stalled"
        time.sleep(1.0)  # five watchdog intervals
        assert "WATCHDOG=1" not in daemon.notify.messages[stalled:]
    finally:
        daemon.stall_file.unlink()
    worker.join(120)
    assert result and result[0].status_code == 200
    daemon.notify.wait_for(lambda m: m == "WATCHDOG=1", 10, stalled)


def test_sighup_swaps_the_key_without_restart(daemon: DaemonProcess) -> None:
    assert daemon.http("GET", "/v1/models", key=OLD_KEY).status_code == 200
    daemon.key_file.write_text(NEW_KEY + "\n")
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while daemon.http("GET", "/v1/models", key=OLD_KEY).status_code != 401:
        assert time.monotonic() < deadline, "old key still accepted after SIGHUP"
        time.sleep(0.1)
    assert daemon.http("GET", "/v1/models", key=NEW_KEY).status_code == 200
    assert daemon.proc.poll() is None
    assert "reloaded" in daemon.stderr()


def test_sighup_with_a_broken_file_keeps_the_running_config(daemon: DaemonProcess) -> None:
    daemon.config_file.write_text(daemon.config_text + "\n[engine2]\n")
    try:
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "config not reloaded" not in daemon.stderr():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "engine2: unknown section" in daemon.stderr()
        assert daemon.http("GET", "/v1/models").status_code == 200
    finally:
        daemon.config_file.write_text(daemon.config_text)


def test_sigusr1_reopens_the_request_log(daemon: DaemonProcess) -> None:
    assert daemon.chat().status_code == 200
    rotated = daemon.request_log.with_suffix(".log.1")
    os.rename(daemon.request_log, rotated)  # what logrotate does before signalling
    daemon.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 20
    while not daemon.request_log.exists():
        assert time.monotonic() < deadline, "request log not reopened"
        time.sleep(0.05)
    response = daemon.chat()
    assert response.status_code == 200
    lines = [json.loads(line) for line in daemon.request_log.read_text().splitlines()]
    assert response.headers["x-request-id"] in [line["request_id"] for line in lines]
    assert all(line.get("client") for line in lines)
    assert rotated.read_text()  # the old lines stayed in the rotated file


async def test_sigterm_drains_running_streams_and_exits_0(daemon: DaemonProcess) -> None:
    client = openai.AsyncOpenAI(base_url=f"{daemon.base_url}/v1", api_key=current_key(daemon), max_retries=0,
                                timeout=120)
    name = daemon.model_name()
    started = [asyncio.Event() for _ in range(8)]

    async def stream(i: int) -> tuple[str | None, int]:
        chunks = await client.chat.completions.create(
            model=name, stream=True, max_tokens=32, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": f"Count from {i} to {i + 30}."}])
        finish, pieces = None, 0
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
                started[i].set()
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return finish, pieces

    tasks = [asyncio.create_task(stream(i)) for i in range(8)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
    assert not any(t.done() for t in tasks), "a stream ended before SIGTERM: make them longer"
    mark = len(daemon.notify.messages)
    daemon.signal(signal.SIGTERM)
    await asyncio.to_thread(daemon.notify.wait_for, lambda m: "STOPPING=1" in m.split("\n"), 20, mark)
    # Draining: new requests are refused with 503 + Retry-After while the streams go on.
    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(model=name, max_tokens=1, messages=[{"role": "user", "content": "x"}])
    assert refused.value.status_code == 503
    assert int(refused.value.response.headers["retry-after"]) >= 1
    results = await asyncio.gather(*tasks)
    assert [finish for finish, _ in results] == ["length"] * 8, daemon.stderr()[-3000:]
    assert all(pieces > 1 for _, pieces in results)
    assert await asyncio.to_thread(daemon.proc.wait, 60) == 0
    assert "exiting with status 0" in daemon.stderr()


def test_killing_the_engine_process_under_load_exits_70_at_once(short_tmp: Path) -> None:
    """SIGKILL to the engine process while streams run: the streams end in an error, /health says
    503 for as long as it answers, and the daemon logs why and exits 70 (systemd restarts it)."""
    daemon = start_daemon(short_tmp, ["--set", "engine.process=separate"])
    try:
        match = re.search(r"engine process (\d+) ready", daemon.stderr())
        assert match, daemon.stderr()[-2000:]
        engine_pid = int(match.group(1))
        name, key = daemon.model_name(), current_key(daemon)
        outcomes: list[str] = []
        flowing = threading.Semaphore(0)

        def stream(i: int) -> None:
            client = openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key=key, max_retries=0, timeout=120)
            chunks = client.completions.create(model=name, prompt=f"Count from {i}:", max_tokens=400, stream=True,
                                               extra_body={"ignore_eos": True})
            finish = None
            try:
                for k, chunk in enumerate(chunks):
                    if k == 2:
                        flowing.release()
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                outcomes.append(f"finished: {finish}")
            except (openai.APIError, ConnectionError) as exc:
                outcomes.append(f"error: {type(exc).__name__}")

        workers = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        for _ in workers:
            assert flowing.acquire(timeout=120), "the streams did not start"
        os.kill(engine_pid, signal.SIGKILL)
        statuses = []
        while daemon.proc.poll() is None:  # /health until the port closes
            try:
                conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5)
                conn.request("GET", "/health")
                statuses.append(conn.getresponse().status)
                conn.close()
            except OSError:
                break
        assert daemon.proc.wait(60) == EX_SOFTWARE
        # Until the kernel has closed the dead process's socket the daemon cannot know (200s);
        # from the moment it knows, /health says 503 until the port closes: never 200 again.
        first_503 = statuses.index(503) if 503 in statuses else len(statuses)
        assert set(statuses[:first_503]) <= {200} and set(statuses[first_503:]) <= {503}, statuses
        for w in workers:
            w.join(60)
        assert len(outcomes) == 4 and all(o.startswith("error") for o in outcomes), outcomes
        stderr = daemon.stderr()
        assert (f"engine died: the engine process (pid {engine_pid}) was killed by signal SIGKILL; "
                f"exiting {EX_SOFTWARE}") in stderr, stderr[-3000:]
    finally:
        daemon.stop()
