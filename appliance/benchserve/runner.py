"""One load point: release the requests on their schedule (or under a concurrency limit), stream
them all, sample the server's /metrics meanwhile, and summarize.

The clock runs from the first release to the last answer (vLLM's benchmark duration). A request's
TTFT starts when it is sent; under a concurrency limit the wait for a slot is reported apart
(`client_queue_ms`), as vLLM does. While a point runs the garbage collector's heap is frozen (as
`vllm bench serve` does): a full collection over everything the client loaded would stall the
event loop that timestamps the chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from appliance.benchserve import arrivals, metrics
from appliance.benchserve.client import ClientConfig, send
from appliance.benchserve.progress import ProgressBar
from appliance.benchserve.record import RequestRecord
from appliance.benchserve.server_metrics import MetricsSampler
from appliance.benchserve.workload import BenchRequest
from appliance.gc_watch import GcPauseWatch


@dataclass(frozen=True)
class LoadPoint:
    rate: float = math.inf  # requests/s; inf: all released at once
    concurrency: int | None = None  # at most this many in flight
    burstiness: float = 1.0  # gamma shape of the gaps (1: Poisson)

    def describe(self) -> str:
        parts = []
        if not math.isinf(self.rate) or self.concurrency is None:
            parts.append(f"rate {self.rate:g} req/s" if not math.isinf(self.rate) else "rate inf")
        if self.concurrency is not None:
            parts.append(f"concurrency {self.concurrency}")
        if self.burstiness != 1.0 and not math.isinf(self.rate):
            parts.append(f"burstiness {self.burstiness:g}")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"rate": "inf" if math.isinf(self.rate) else self.rate, "concurrency": self.concurrency,
                "burstiness": self.burstiness, "arrivals": self.arrivals()}

    def arrivals(self) -> str:
        if math.isinf(self.rate):
            return "all at once"
        return "poisson" if self.burstiness == 1.0 else "gamma"


@dataclass(frozen=True)
class RunOptions:
    percentiles: Sequence[float] = metrics.DEFAULT_PERCENTILES
    goodput_limits_ms: dict[str, float] | None = None
    slos: Sequence[metrics.Slo] = ()
    sample_server_metrics: bool = True
    metrics_interval_s: float = 0.5
    progress: bool = True
    keep_requests: bool = True  # per-request figures in the result
    keep_itls: bool = False  # and every gap between each request's chunks (vLLM's --save-detailed `itls`)


def new_session(limit: int | None = None) -> aiohttp.ClientSession:
    # NOTE: aiohttp caps a session at 100 connections by default; at rate inf that cap would be
    # the load. limit=0 lifts it; a concurrency point holds as many connections as its limit (and a
    # semaphore, so a request's clock starts only once it has its slot), as vLLM's client does.
    # trust_env: the proxy variables (HTTP(S)_PROXY, NO_PROXY) and ~/.netrc apply, as in vLLM's
    # client and the openai library. aiohttp looks them up on every request, which costs ~0.6 ms
    # of the TTFT clock on a loopback request; vLLM's client pays the same, and without it a lone
    # request's TTFT read 0.7 ms (6%) lower than `vllm bench serve` on the same server
    # (docs/bench-serve.md).
    connector = aiohttp.TCPConnector(limit=limit or 0, limit_per_host=limit or 0, keepalive_timeout=60)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None), trust_env=True)


async def run_point(config: ClientConfig, requests: Sequence[BenchRequest], point: LoadPoint, *, seed: int,
                    options: RunOptions, count_tokens: Callable[[str], int] | None = None) -> dict[str, Any]:
    offsets = arrivals.schedule_s(len(requests), point.rate, point.burstiness, seed)
    slots = asyncio.Semaphore(point.concurrency) if point.concurrency else None
    bar = ProgressBar(len(requests), point.describe(), enabled=options.progress)
    lag = _LoopLag()
    async with new_session(point.concurrency) as session, _frozen_heap() as pauses, lag:
        sampler = None
        if options.sample_server_metrics:
            sampler = MetricsSampler(session, config.base_url, options.metrics_interval_s, config.headers())
            await sampler.start()

        async def one(request: BenchRequest, due_s: float) -> RequestRecord:
            if slots is None:
                record = await send(session, config, request, due_s, count_tokens)
            else:
                async with slots:
                    record = await send(session, config, request, due_s, count_tokens)
            bar.update(record.ok)
            return record

        t0 = time.perf_counter()
        tasks = []
        for request, offset_s in zip(requests, offsets, strict=True):
            wait_s = t0 + offset_s - time.perf_counter()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            tasks.append(asyncio.create_task(one(request, time.perf_counter())))
        records = await asyncio.gather(*tasks)
        duration_s = time.perf_counter() - t0
        bar.close()
        server = await sampler.stop() if sampler is not None else None
    summary = metrics.summarize(records, duration_s, percentiles=options.percentiles,
                                goodput_limits_ms=options.goodput_limits_ms, slos=options.slos)
    result: dict[str, Any] = {"load": point.to_json(), "seed": seed, **summary,
                              "offered_rate": None if math.isinf(point.rate) else len(requests) / offsets[-1],
                              "server_metrics": server, "client_gc": _gc_summary(pauses),
                              "client_loop_lag_ms": lag.summary()}
    if options.keep_requests:
        # sent_ms: from t0, whose perf_counter() reading is clock_origin_s (CLOCK_MONOTONIC on Linux:
        # one clock for every process of the machine, so two clients run side by side line up).
        result["clock_origin_s"] = t0
        result["requests"] = {"columns": list(REQUEST_COLUMNS), "rows": [_row(r, t0) for r in records]}
    if options.keep_itls:
        result["itls_ms"] = [[round(gap * 1e3, 4) for gap in r.itls_s] for r in records]
    return result


@contextlib.asynccontextmanager
async def _frozen_heap() -> AsyncIterator[GcPauseWatch]:
    """Everything alive now leaves the collector's view for the run (objects made during it are
    still collected by the young generations, as always); back in view afterwards. Meanwhile the
    collector's pauses are counted: each one stalls the loop that timestamps the chunks, so every
    open stream reads one longer gap (reported so that a client-side tail can be told from the
    server's, docs/bench-serve.md)."""
    gc.collect()
    gc.freeze()
    pauses = GcPauseWatch("bench serve client", threshold_s=0.005, log_long=False).install()
    try:
        yield pauses
    finally:
        pauses.uninstall()
        gc.unfreeze()


def _gc_summary(pauses: GcPauseWatch) -> dict[str, Any]:
    return {"collections": pauses.collections, "total_ms": round(pauses.total_s * 1e3, 3),
            "max_ms": round(pauses.longest_s * 1e3, 3), "over_5ms": pauses.long_pauses}


class _LoopLag:
    """How late this client's event loop ran during a point: a task asks to wake every
    `interval_s` and records by how much each wake-up came late. A chunk read while the loop is
    late is stamped late by as much, so when the lag is comparable to the gaps being measured
    (a saturated client: thousands of streams, or a busy machine), ITL and TTFT carry the
    client's delay and say less about the server (report.warnings_text says so)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.lags_s: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.lags_s.append(max(0.0, loop.time() - due))

    async def __aenter__(self) -> _LoopLag:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def summary(self) -> dict[str, Any]:
        lags = self.lags_s
        if not lags:
            return {"samples": 0, "p50": None, "p99": None, "max": None}
        return {"samples": len(lags), "p50": round(metrics.percentile(lags, 50) * 1e3, 3),
                "p99": round(metrics.percentile(lags, 99) * 1e3, 3), "max": round(max(lags) * 1e3, 3)}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1e3, 3)


REQUEST_COLUMNS = ("prompt_tokens", "output_tokens", "ttft_ms", "tpot_ms", "e2e_ms", "max_itl_ms",
                   "client_queue_ms", "finish_reason", "error_kind", "sent_ms")


def _row(r: RequestRecord, t0: float) -> list[Any]:
    sent = _ms(r.start_s - t0)
    if not r.ok:
        return [r.prompt_tokens, 0, None, None, None, None, _ms(r.client_queue_s), None, r.error_kind, sent]
    return [r.prompt_tokens, r.output_tokens, _ms(r.ttft_s), _ms(r.tpot_s), _ms(r.e2e_s),
            _ms(max(r.itls_s, default=None)), _ms(r.client_queue_s), r.finish_reason, None, sent]
