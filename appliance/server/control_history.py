"""Once-a-second samples of the daemon's cumulative counters, and the windowed figures the control
socket reports from them: token and request rates, TTFT / inter-token quantiles over the last
minute, 429s and per-client traffic over the last minute, per-request tokens/s.

Sources, all read through their public interfaces: the engine's `stats()` (token totals), the
HTTP app's Prometheus metrics (request, rejection and per-client counters, latency histograms;
`Collector.collect()` samples), and `ServiceState.requests()` (rows in flight). A window is the
difference between the newest sample and the oldest one inside it, so nothing is re-observed and
the request path pays nothing for the dashboard.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

RATE_WINDOW_S = 10.0  # tokens/s and requests/s
MINUTE_S = 60.0  # latency quantiles, 429s and per-client use
KEEP_S = MINUTE_S + 5.0
RATE_HISTORY_S = 300  # /history: five minutes of throughput figures, one a second

Buckets = tuple[tuple[float, float], ...]  # (upper bound le, cumulative count), le ascending, +inf last


@dataclass
class Sample:
    """Cumulative counters at one instant (time.monotonic())."""

    time_s: float
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: float = 0.0
    rejected: float = 0.0
    ttft: Buckets = ()
    inter_token: Buckets = ()
    # per client: requests answered (any status), 429s, prompt tokens, generation tokens
    client_requests: dict[str, float] = field(default_factory=dict)
    client_rejected: dict[str, float] = field(default_factory=dict)
    client_prompt_tokens: dict[str, float] = field(default_factory=dict)
    client_generation_tokens: dict[str, float] = field(default_factory=dict)


def _sum_by(metric: Any, label: str | None, suffix: str = "_total") -> dict[str, float]:
    """Sum a prometheus Counter's samples by one label (None: one total under key "")."""
    out: dict[str, float] = {}
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith(suffix):
                key = s.labels.get(label, "") if label else ""
                out[key] = out.get(key, 0.0) + s.value
    return out


def _buckets(histogram: Any) -> Buckets:
    by_le: dict[float, float] = {}
    for family in histogram.collect():
        for s in family.samples:
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                by_le[le] = by_le.get(le, 0.0) + s.value
    return tuple(sorted(by_le.items()))


def sample_metrics(sample: Sample, metrics: Any) -> None:
    """Fill `sample` from a `ServerMetrics` (appliance/server/metrics.py)."""
    sample.requests_finished = sum(_sum_by(metrics.request_success, None).values())
    sample.client_requests = _sum_by(metrics.client_requests, "client")
    sample.client_rejected = _sum_by(metrics.client_rejections, "client")
    sample.rejected = sum(sample.client_rejected.values())
    sample.client_prompt_tokens = _sum_by(metrics.client_prompt_tokens, "client")
    sample.client_generation_tokens = _sum_by(metrics.client_generation_tokens, "client")
    sample.ttft = _buckets(metrics.time_to_first_token)
    sample.inter_token = _buckets(metrics.inter_token_latency)


def bucket_delta(new: Buckets, old: Buckets) -> Buckets:
    old_by_le = dict(old)
    return tuple((le, count - old_by_le.get(le, 0.0)) for le, count in new)


def quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile of a cumulative histogram, linear inside the bucket it falls in (the way
    Prometheus' histogram_quantile does); None without observations. A rank in the +Inf bucket
    answers the largest finite bound: the histogram knows no more."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank and count > lower_count:
            if math.isinf(le):
                return lower_le
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    return lower_le


class History:
    """The last KEEP_S seconds of samples, plus per-request output rates."""

    def __init__(self) -> None:
        self.samples: deque[Sample] = deque()
        self._request_tokens: dict[str, tuple[float, int]] = {}
        self.request_tokens_per_s: dict[str, float] = {}

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        while len(self.samples) > 2 and sample.time_s - self.samples[1].time_s >= KEEP_S:
            self.samples.popleft()

    def add_requests(self, now_s: float, rows: list[dict[str, Any]]) -> None:
        """Output tokens/s of each request in flight since the previous call."""
        seen: dict[str, tuple[float, int]] = {}
        rates: dict[str, float] = {}
        for row in rows:
            rid, tokens = row["id"], row["completion_tokens"]
            seen[rid] = (now_s, tokens)
            previous = self._request_tokens.get(rid)
            if previous is not None and now_s > previous[0]:
                rates[rid] = (tokens - previous[1]) / (now_s - previous[0])
        self._request_tokens = seen
        self.request_tokens_per_s = rates

    def window(self, seconds: float) -> tuple[Sample, Sample] | None:
        """(oldest sample at most `seconds` before the newest, newest); None under two samples."""
        if len(self.samples) < 2:
            return None
        newest = self.samples[-1]
        oldest = newest
        for s in reversed(self.samples):
            if newest.time_s - s.time_s > seconds:
                break
            oldest = s
        if oldest is newest:
            oldest = self.samples[-2]
        return oldest, newest
