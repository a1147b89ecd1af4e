"""Dashboard tests: a real daemon (default model, CPU) on a real control socket for the pilot
tests; recorded events for the snapshot tests."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import CONFIG, start_daemon  # noqa: E402


@pytest.fixture(scope="module")
def daemon() -> Iterator[Any]:
    """One daemon shared by a module's tests (each leaves it ready as it found it)."""
    workdir = Path(tempfile.mkdtemp(prefix="llmd-", dir="/tmp"))
    d = start_daemon(workdir, config_text=CONFIG)
    yield d
    d.stop()
    shutil.rmtree(workdir, ignore_errors=True)


async def until(pilot: Any, predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Let the app run until `predicate()` holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.1)
    await asyncio.sleep(0)
