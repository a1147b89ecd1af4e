"""A real daemon for the dashboard tests (tests/daemon/conftest.py's `start_daemon`), two clients
with quotas, and a load generator of real chat requests over HTTP."""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from typing import Any

_spec = importlib.util.spec_from_file_location(
    "daemon_conftest", Path(__file__).resolve().parents[1] / "daemon" / "conftest.py")
assert _spec is not None and _spec.loader is not None
daemon_conftest = sys.modules.setdefault("daemon_conftest", importlib.util.module_from_spec(_spec))
if not hasattr(daemon_conftest, "DaemonProcess"):
    _spec.loader.exec_module(daemon_conftest)

DaemonProcess = daemon_conftest.DaemonProcess
start_daemon = daemon_conftest.start_daemon

BATCH_KEY = "sk-batch-client"
# "app" (the key file's key) with per-minute quotas; "batch" allowed one request at a time, so a
# second concurrent one is a real 429.
# The daemon tests' config (its last table is the "app" client) plus quotas and a second client.
CONFIG = daemon_conftest.DEFAULT_CONFIG.rstrip("\n") + f"""
requests_per_minute = 600
tokens_per_minute = 200000

[[clients]]
name = "batch"
api_key = "{BATCH_KEY}"
max_concurrent_requests = 1
"""

PROMPTS = ["Write a short poem about the sea.", "List three colours and why you like them.",
           "Explain what a GPU does, briefly.", "Tell me a very short story about a cat."]


class Load:
    """`streams` threads sending streamed chat requests until stopped: the odd ones as "batch"
    (so two of them collide on its one-at-a-time quota: 429s), the others as "app"."""

    def __init__(self, daemon: Any, streams: int = 4, max_tokens: int = 48) -> None:
        self.daemon = daemon
        self.max_tokens = max_tokens
        self.stop_event = threading.Event()
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(streams)]

    def _run(self, index: int) -> None:
        model = self.daemon.model_name()
        n = 0
        while not self.stop_event.is_set():
            key = BATCH_KEY if index % 2 else "current"
            # Streamed, so the daemon counts each request's output tokens as they come.
            body = {"model": model, "max_tokens": self.max_tokens, "temperature": 0.8, "stream": True,
                    "messages": [{"role": "user", "content": PROMPTS[(index + n) % len(PROMPTS)]}]}
            try:
                status = self.daemon.http("POST", "/v1/chat/completions", body, key=key).status_code
            except OSError:
                if self.stop_event.is_set():
                    return
                raise
            self.statuses.append(status)
            if status == 429:
                self.stop_event.wait(0.5)  # the quota's Retry-After is a second; try again soon
            n += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(120)
