"""The server's own view during a run: GET /metrics sampled every `interval_s`.

Read under each server's names: ours (vLLM's names, plus `llm_appliance_*`), vLLM's (current and
older), SGLang's and llama.cpp's. Gauges (KV-cache usage, running, waiting) are summarized as mean
and max over the samples; counters (preemptions, prefix-cache hits, admission rejections) as their
increase over the run. What a server does not expose is listed as such, not reported as zero.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# field -> names to look for, first match wins. Counter names are given without `_total`.
GAUGES: dict[str, tuple[str, ...]] = {
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage",
                       "llamacpp:kv_cache_usage_ratio"),
    "requests_running": ("vllm:num_requests_running", "sglang:num_running_reqs", "llamacpp:requests_processing"),
    "requests_waiting": ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "llamacpp:requests_deferred"),
}
COUNTERS: dict[str, tuple[str, ...]] = {
    "preemptions": ("vllm:num_preemptions",),
    "prefix_cache_queries": ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
    "prefix_cache_hits": ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
    "rejections": ("llm_appliance_client_rejections",),
}


WANTED = frozenset(name for names in (*GAUGES.values(), *COUNTERS.values()) for name in names)
_SUFFIXES = ("_total", "_created", "_bucket", "_sum", "_count")


def _base_name(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def keep_families(text: str, families: frozenset[str]) -> str:
    """The lines of Prometheus text that belong to `families` (samples and their # HELP/# TYPE).

    NOTE: a scrape is parsed on the event loop that timestamps the chunks. Our daemon's /metrics is
    ~33 kB of histograms, which prometheus_client's parser takes 20-40 ms over on a slow core: every
    half second the client would stop reading. Cutting the text down to the handful of families
    read here first makes that well under a millisecond.
    """
    kept = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            name = parts[2] if len(parts) > 2 and parts[1] in ("HELP", "TYPE") else ""
        else:
            name = line.split("{", 1)[0].split(None, 1)[0] if line.strip() else ""
        if name and not name.endswith("_created") and _base_name(name) in families:
            kept.append(line)
    return "\n".join(kept) + "\n"


def parse(text: str, families: frozenset[str] | None = None) -> dict[str, float]:
    """{sample name: value summed over label sets} from Prometheus text; `_total` suffixes dropped.
    With `families`, only those are read (the rest of the text is skipped unparsed)."""
    if families is not None:
        text = keep_families(text, families)
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        # A labelled counter with no children yet (no rejection so far) is exposed, at zero.
        values.setdefault(family.name.removesuffix("_total"), 0.0)
        for sample in family.samples:
            name = sample.name
            if name.endswith(("_created", "_bucket", "_sum", "_count")):
                continue
            name = name.removesuffix("_total")
            values[name] = values.get(name, 0.0) + float(sample.value)
    return values


def pick(values: dict[str, float], names: Sequence[str]) -> tuple[str, float] | None:
    for name in names:
        if name in values:
            return name, values[name]
    return None


class MetricsSampler:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, interval_s: float = 0.5,
                 headers: dict[str, str] | None = None) -> None:
        self.session = session
        self.url = base_url.rstrip("/") + "/metrics"
        self.interval_s = interval_s
        self.headers = headers or {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0

    async def _scrape(self) -> dict[str, float] | None:
        try:
            async with self.session.get(self.url, headers=self.headers,
                                        timeout=aiohttp.ClientTimeout(total=10)) as r:
                if r.status != 200:
                    self.error = f"GET /metrics answered {r.status}"
                    return None
                return parse(await r.text(), WANTED)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.error = f"GET /metrics failed: {type(exc).__name__}: {exc}"
            return None

    async def _loop(self) -> None:
        while True:
            values = await self._scrape()
            if values is not None:
                self.samples.append((time.perf_counter() - self._t0, values))
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        self._t0 = time.perf_counter()
        first = await self._scrape()  # the counters' starting point
        if first is not None:
            self.samples.append((0.0, first))
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        last = await self._scrape()  # the counters' end point
        if last is not None:
            self.samples.append((time.perf_counter() - self._t0, last))
        return self.summary()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "samples": len(self.samples), "interval_s": self.interval_s}
        if self.error and not self.samples:
            out["error"] = self.error
            return out
        exposed: dict[str, str] = {}
        for field, names in GAUGES.items():
            found = [pick(v, names) for _, v in self.samples]
            got = [f for f in found if f is not None]
            if not got:
                out[field] = None
                continue
            exposed[field] = got[0][0]
            vals = [v for _, v in got]
            out[field] = {"mean": sum(vals) / len(vals), "max": max(vals)}
        for field, names in COUNTERS.items():
            first = pick(self.samples[0][1], names) if self.samples else None
            last = pick(self.samples[-1][1], names) if self.samples else None
            if first is None or last is None:
                out[field] = None
                continue
            exposed[field] = first[0]
            out[field] = last[1] - first[1]
        queries, hits = out.get("prefix_cache_queries"), out.get("prefix_cache_hits")
        out["prefix_cache_hit_rate"] = hits / queries if queries and hits is not None else None
        out["exposed_as"] = exposed
        out["not_exposed"] = sorted(k for k in [*GAUGES, *COUNTERS] if k not in exposed)
        out["timeline"] = [
            [round(t, 3), *((pick(v, names) or (None, None))[1] for names in GAUGES.values())]
            for t, v in self.samples
        ]
        out["timeline_columns"] = ["t_s", *GAUGES]
        if self.error:
            out["last_error"] = self.error
        return out
