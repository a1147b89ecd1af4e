"""Replays recorded control-socket events (tests/dashboard/data/*.json, written by record.py) as
a `DaemonSource`, and a fixed GPU snapshot as a GPU sampler, so snapshot tests are deterministic.
Actions answer the way a daemon of that state would refuse: the recording is read-only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

from appliance.ctl import ControlError
from appliance.status import (
    CancelResult,
    GpuSnapshot,
    LogLevelResult,
    PhaseResult,
    RateHistory,
    ReloadResult,
    RequestList,
    RequestRow,
    StatusSnapshot,
    from_json,
    loads,
    parse_event,
)

DATA = Path(__file__).resolve().parent / "data"


def recorded_events(name: str) -> list[StatusSnapshot | RequestList]:
    raw = json.loads((DATA / f"{name}.json").read_text())
    return [parse_event(e["event"], json.dumps(e["data"])) for e in raw]


def recorded_gpus(name: str) -> GpuSnapshot:
    return loads(GpuSnapshot, (DATA / f"{name}.json").read_text())


class RecordedSource:
    """Sends every recorded event once, then stays connected and silent."""

    def __init__(self, events: list[StatusSnapshot | RequestList], description: str = "/run/llm-appliance/control.sock") -> None:
        self.events_list = events
        self.description = description
        self.done = asyncio.Event()
        self.last_status = [e for e in events if isinstance(e, StatusSnapshot)][-1]

    async def status(self) -> StatusSnapshot:
        return next(e for e in self.events_list if isinstance(e, StatusSnapshot))

    async def requests(self) -> list[RequestRow]:
        return []

    async def history(self) -> RateHistory:
        return RateHistory()  # the sparklines fill from the replayed events alone

    async def events(self) -> AsyncIterator[StatusSnapshot | RequestList]:
        for event in self.events_list:
            yield event
        self.done.set()
        await asyncio.Event().wait()

    async def _read_only(self) -> None:
        raise ControlError(409, "a recording cannot be changed")

    async def cancel(self, request_id: str) -> CancelResult:
        await self._read_only()
        raise AssertionError

    async def drain(self) -> PhaseResult:
        await self._read_only()
        raise AssertionError

    async def resume(self) -> PhaseResult:
        await self._read_only()
        raise AssertionError

    async def reload(self) -> ReloadResult:
        await self._read_only()
        raise AssertionError

    async def set_log_level(self, level: str) -> LogLevelResult:
        await self._read_only()
        raise AssertionError

    async def close(self) -> None:
        pass


class FixedGpus:
    def __init__(self, snapshot: GpuSnapshot) -> None:
        self.snapshot = snapshot

    def sample(self) -> GpuSnapshot:
        return self.snapshot

    def close(self) -> None:
        pass


__all__ = ["RecordedSource", "FixedGpus", "recorded_events", "recorded_gpus", "from_json"]
