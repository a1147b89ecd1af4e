"""Snapshot tests at 80x24 (an SSH terminal) and 160x48: busy, idle, no GPU, daemon down.

Deterministic: the daemon's side is replayed from events recorded off a real daemon
(data/*.json, `record.py`), the GPU side is a fixed snapshot (data/gpu_h200.json, recorded
on an H200), and "daemon down" is the real
client on a socket path where nothing exists. Update with `pytest --snapshot-update` and look at
the SVGs in __snapshots__/ before committing them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from recorded import FixedGpus, RecordedSource, recorded_events, recorded_gpus
from test_nvml import BUSY

from appliance.dashboard.app import DashboardApp
from appliance.dashboard.client import ControlSocketClient
from appliance.dashboard.widgets.banner import Banner
from appliance.status import GpuSnapshot

SIZES = [(80, 24), (160, 48)]
# Real NVML readings of an H200 under a matmul load (bench/gpu_dashboard_card.py on the lent GPU).
H200 = recorded_gpus("gpu_h200")
ONE_GPU = H200
# Two cards: the H200 as recorded, and the test's constructed reading of a busier one.
TWO_GPUS = GpuSnapshot(gpus=[H200.gpus[0], dataclasses.replace(BUSY, index=1)],
                       driver_version=H200.driver_version)
NO_GPU = GpuSnapshot(error="no NVIDIA GPU: NVML Shared Library Not Found")


def _replay(name: str, gpus: GpuSnapshot) -> tuple[DashboardApp, Any]:
    source = RecordedSource(recorded_events(name))
    app = DashboardApp(source, FixedGpus(gpus), gpu_interval_s=3600)

    async def run_before(pilot: Any) -> None:
        await source.done.wait()
        await pilot.pause()
        await pilot.wait_for_scheduled_animations()

    return app, run_before


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_busy(snap_compare: Any, size: tuple[int, int]) -> None:
    app, run_before = _replay("busy", ONE_GPU)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_idle(snap_compare: Any, size: tuple[int, int]) -> None:
    app, run_before = _replay("idle", TWO_GPUS)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_no_gpu(snap_compare: Any, size: tuple[int, int]) -> None:
    app, run_before = _replay("busy", NO_GPU)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_daemon_down(snap_compare: Any, size: tuple[int, int]) -> None:
    app = DashboardApp(ControlSocketClient("/run/llm-appliance/control.sock.absent"), FixedGpus(NO_GPU),
                       gpu_interval_s=3600)

    async def run_before(pilot: Any) -> None:
        while app.query_one(Banner).connection.attempt == 0:
            await pilot.pause(0.05)
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)
