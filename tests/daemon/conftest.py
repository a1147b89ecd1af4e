"""A real daemon process for the daemon tests: `llm-appliance serve` with the default model on CPU,
a real NOTIFY_SOCKET bound here (a datagram socket), a control socket, a key file and a request
log in a short temporary directory (Unix socket paths are limited to 107 bytes)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
WATCHDOG_USEC = 400_000  # the daemon pings every 0.2 s
STALL_TIMEOUT_S = 1.5


class NotifyListener:
    """The systemd side of sd_notify: records every datagram with its arrival order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        self._sock.settimeout(0.2)
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append(data.decode())
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], timeout_s: float, start: int = 0) -> int:
        """Index of the first message from `start` on that matches; fails after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for i in range(start, len(self.messages)):
                    if predicate(self.messages[i]):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching notify message in {timeout_s} s; got {self.messages[start:]}")
                self._cond.wait(left)

    def count(self, line: str) -> int:
        with self._cond:
            return sum(line in m.split("\n") for m in self.messages)

    def close(self) -> None:
        self._closed = True
        self._sock.close()


@dataclass
class Response:
    status_code: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class DaemonProcess:
    def __init__(self, workdir: Path, extra_args: list[str], config_text: str) -> None:
        self.dir = workdir
        self.key_file = workdir / "app.key"
        self.key_file.write_text("sk-old-key\n")
        self.config_file = workdir / "appliance.toml"
        self.config_text = config_text.replace("@KEY_FILE@", str(self.key_file))
        self.config_file.write_text(self.config_text)
        self.control_socket = str(workdir / "control.sock")
        self.request_log = workdir / "requests.log"
        self.stall_file = workdir / "stall"
        self.fail_file = workdir / "fail"
        self.stderr_path = workdir / "stderr.log"
        self.notify = NotifyListener(str(workdir / "notify.sock"))
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC),
               "LLM_APPLIANCE_TEST_STALL_FILE": str(self.stall_file),
               "LLM_APPLIANCE_TEST_FAIL_FILE": str(self.fail_file), "PYTHONUNBUFFERED": "1"}
        env.pop("WATCHDOG_PID", None)
        cmd = [sys.executable, "-m", "appliance.cli", "serve", "--config", str(self.config_file),
               "--port", "0", "--control-socket", self.control_socket, "--request-log", str(self.request_log),
               "--set", f"server.stall_timeout_s={STALL_TIMEOUT_S}", "--drain-timeout", "120", *extra_args]
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        self.stall_timeout_s = STALL_TIMEOUT_S
        self.port = 0
        self.ready_index = -1

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        try:
            self.ready_index = self.notify.wait_for(lambda m: "READY=1" in m.split("\n"), timeout_s)
        except AssertionError:
            self.proc.kill()
            raise AssertionError(f"daemon not ready; stderr:\n{self.stderr()}") from None
        match = re.search(r"STATUS=serving .* on [\d.]+:(\d+)", self.notify.messages[self.ready_index])
        assert match, self.notify.messages[self.ready_index]
        self.port = int(match.group(1))

    def http(self, method: str, path: str, body: Any = None, key: str | None = "current",
             timeout_s: float = 120.0) -> Response:
        """One request to the HTTP API (stdlib client). key="current": the key file's key."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if key == "current":
            key = self.key_file.read_text().strip()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def model_name(self) -> str:
        return self.http("GET", "/v1/models").json()["data"][0]["id"]

    def chat(self, content: str = "Say hi.", max_tokens: int = 4) -> Response:
        return self.http("POST", "/v1/chat/completions", {
            "model": self.model_name(), "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}]})

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()


DEFAULT_CONFIG = """
[engine]
cpu_kv_cache_bytes = 67108864
max_model_len = 512

[[clients]]
name = "app"
api_key_file = "@KEY_FILE@"
"""


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="llma-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_daemon(workdir: Path, extra_args: list[str] | None = None,
                 config_text: str = DEFAULT_CONFIG) -> DaemonProcess:
    daemon = DaemonProcess(workdir, extra_args or [], config_text)
    try:
        daemon.wait_ready()
    except BaseException:
        daemon.stop()
        raise
    return daemon


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """One daemon shared by a module's tests (each leaves it ready as it found it)."""
    workdir = Path(tempfile.mkdtemp(prefix="llma-", dir="/tmp"))
    d = start_daemon(workdir)
    yield d
    d.stop()
    shutil.rmtree(workdir, ignore_errors=True)
