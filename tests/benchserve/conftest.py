"""Servers for the bench-serve tests: the simulated M/D/1 server (sim_server.py) in its own process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# vllm_reference.py (vLLM's benchmark definitions, the tests' reference) imports as a plain module.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
SERVICE_MS = 50.0  # the simulated server's capacity is 1000 / SERVICE_MS = 20 req/s


@dataclass(frozen=True)
class SimServer:
    url: str
    service_ms: float

    @property
    def capacity_rps(self) -> float:
        return 1000.0 / self.service_ms


@pytest.fixture(autouse=True, scope="session")
def _loopback_is_never_proxied() -> Iterator[None]:
    """The client honours proxy variables (as vLLM's does), and so do the fixtures' urllib probes;
    every server here is on loopback, so a machine with HTTP_PROXY set must not route the tests
    through it."""
    import os

    with pytest.MonkeyPatch.context() as mp:
        for var in ("NO_PROXY", "no_proxy"):
            mp.setenv(var, ",".join(filter(None, [os.environ.get(var, ""), "127.0.0.1", "localhost"])))
        yield


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    proc = subprocess.Popen([sys.executable, str(HERE / "sim_server.py"), "--service-ms", str(SERVICE_MS),
                             "--itl-ms", "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PORT "), f"simulated server did not start: {line!r}"
        yield SimServer(f"http://127.0.0.1:{int(line.split()[1])}", SERVICE_MS)
    finally:
        proc.terminate()
        proc.wait(10)
