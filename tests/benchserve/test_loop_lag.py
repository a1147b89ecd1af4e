"""The client watches its own event loop: a run in which the client is too busy to stamp chunks
on time says so (the figures would carry the client's delay, not the server's)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from appliance.benchserve import report, runner
from appliance.benchserve.client import ClientConfig
from appliance.benchserve.workload import BenchRequest


def _run(sim: Any, busy_ms: float) -> dict[str, Any]:
    config = ClientConfig(base_url=sim.url, model="sim")
    requests = [BenchRequest(index=i, max_tokens=40, prompt_len=3, body=f"question {i}") for i in range(8)]

    async def main() -> dict[str, Any]:
        async def hog() -> None:  # another part of the client that blocks its loop now and then
            while True:
                await asyncio.sleep(0.05)
                time.sleep(busy_ms / 1e3)

        task = asyncio.create_task(hog()) if busy_ms else None
        try:
            return await runner.run_point(config, requests, runner.LoadPoint(concurrency=8), seed=0,
                                          options=runner.RunOptions(progress=False, sample_server_metrics=False))
        finally:
            if task is not None:
                task.cancel()

    return asyncio.run(main())


def test_a_client_that_blocks_its_loop_reports_the_lag_and_warns(sim: Any) -> None:
    run = _run(sim, busy_ms=30.0)
    lag = run["client_loop_lag_ms"]
    assert run["completed"] == 8 and lag["samples"] > 10
    assert lag["max"] >= 25.0 and lag["p99"] >= 25.0, lag  # every hog blocks the loop 30 ms
    text = report.warnings_text([run])
    assert "event loop ran" in text and "c=8" in text


def test_the_lag_is_recorded_on_every_run(sim: Any) -> None:
    run = _run(sim, busy_ms=0.0)
    lag = run["client_loop_lag_ms"]
    assert run["completed"] == 8 and lag["samples"] > 10
    assert 0.0 <= lag["p50"] <= lag["p99"] <= lag["max"]
