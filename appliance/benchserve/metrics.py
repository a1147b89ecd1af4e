"""The arithmetic of a serving benchmark, with the definitions `vllm bench serve` uses (vLLM
0.26.0; docs/bench-serve.md compares the two clients point by point, and
tests/benchserve/test_vllm_definitions.py runs both definitions on the same streams).

- TTFT: from just before the request is sent (after its concurrency slot) to the first chunk
  carrying output (completions: any choice, even with empty text).
- TPOT: per request, (E2E - TTFT) / (output tokens - 1), over requests with more than one token;
  output tokens are the server's usage count (else the tokenizer's count of the text).
- ITL: every gap between consecutive output chunks, pooled over all requests.
- E2E: sent to the last output chunk (the usage chunk and [DONE] after it do not count).
- Throughput: completed requests, output tokens and input + output tokens over the wall time from
  just before the first release to the last answer.
- Mean, population std, and percentiles by linear interpolation between closest ranks (numpy's
  default method; p50 is numpy's median).
- Goodput: completed requests per second whose TTFT, TPOT, E2E and worst ITL all meet the
  per-request limits (a single-token answer counts as TPOT 0, as vLLM does).
- SLOs: limits on percentiles of the whole run (`p99 TTFT <= 500 ms`), which a run meets or not;
  a run with any failed request does not meet them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.benchserve.record import RequestRecord

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_LABELS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E"}
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile {p} is outside 0..100")
    ordered = sorted(values)
    rank = p / 100.0 * (len(ordered) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def percentile_key(p: float) -> str:
    """50 -> 'p50', 99.9 -> 'p99.9' (vLLM's spelling)."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def distribution_ms(values_s: Sequence[float], percentiles: Iterable[float]) -> dict[str, float | None]:
    """mean, std (population), each percentile and max, in milliseconds; None where there is no value."""
    keys = ["mean", "std", *(percentile_key(p) for p in percentiles), "max"]
    if not values_s:
        return dict.fromkeys(keys)
    n = len(values_s)
    mean = sum(values_s) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values_s) / n)
    out: dict[str, float | None] = {"mean": mean * 1e3, "std": std * 1e3}
    for p in percentiles:
        out[percentile_key(p)] = percentile(values_s, p) * 1e3
    out["max"] = max(values_s) * 1e3
    return out


@dataclass(frozen=True)
class Slo:
    """A limit on one percentile of one metric over a whole run: `p99 ttft <= 500 ms`."""

    metric: str
    percentile: float
    limit_ms: float

    def describe(self) -> str:
        return f"{percentile_key(self.percentile)} {METRIC_LABELS[self.metric]} \u2264 {self.limit_ms:g} ms"


_SLO_RE = re.compile(r"^(?:p(?P<p>\d+(?:\.\d+)?)[-_ ])?(?P<metric>[a-z0-9]+):(?P<ms>[0-9.eE+-]+)$")


def _metric_name(name: str) -> str:
    name = {"e2e": "e2el"}.get(name, name)
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}: one of ttft, tpot, itl, e2el")
    return name


def parse_slos(texts: Iterable[str]) -> list[Slo]:
    """`p99-ttft:500`, `ttft:500` (p99) or a comma-separated list of them; limits in ms."""
    slos: list[Slo] = []
    for text in texts:
        for part in (t.strip().lower() for t in text.split(",")):
            if not part:
                continue
            m = _SLO_RE.match(part)
            if not m:
                raise ValueError(f"SLO {part!r}: expected [pNN-]METRIC:MILLISECONDS, e.g. p99-ttft:500")
            p = float(m.group("p") or 99)
            ms = float(m.group("ms"))
            if not 0 < p <= 100 or not ms > 0:
                raise ValueError(f"SLO {part!r}: percentile in (0, 100] and a positive limit, please")
            slos.append(Slo(_metric_name(m.group("metric")), p, ms))
    return slos


def parse_goodput(texts: Iterable[str]) -> dict[str, float]:
    """Per-request limits for goodput: `ttft:500 tpot:50` (vLLM's syntax, ms)."""
    limits: dict[str, float] = {}
    for text in texts:
        for part in (t.strip().lower() for t in text.split(",")):
            if not part:
                continue
            name, sep, value = part.partition(":")
            if not sep:
                raise ValueError(f"goodput limit {part!r}: expected METRIC:MILLISECONDS, e.g. ttft:500")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"goodput limit {part!r}: {value!r} is not a number of ms") from None
            if ms <= 0:
                raise ValueError(f"goodput limit {part!r}: the limit must be positive")
            limits[_metric_name(name)] = ms
    return limits


def _request_is_good(r: RequestRecord, limits_ms: dict[str, float]) -> bool:
    per_request = {"ttft": r.ttft_s, "tpot": r.tpot_s or 0.0, "e2el": r.e2e_s, "itl": max(r.itls_s, default=0.0)}
    return all(per_request[name] * 1e3 <= limit for name, limit in limits_ms.items())


def errors_by_kind(records: Iterable[RequestRecord], max_messages: int = 5) -> dict[str, dict[str, Any]]:
    """{kind: {"count": n, "messages": {message: n}}}, the most frequent messages first."""
    kinds: dict[str, dict[str, int]] = {}
    for r in records:
        if r.error_kind is not None:
            messages = kinds.setdefault(r.error_kind, {})
            messages[r.error_message] = messages.get(r.error_message, 0) + 1
    out: dict[str, dict[str, Any]] = {}
    for kind, messages in sorted(kinds.items()):
        top = sorted(messages.items(), key=lambda kv: -kv[1])
        out[kind] = {"count": sum(messages.values()), "messages": dict(top[:max_messages]),
                     "other_messages": max(len(top) - max_messages, 0)}
    return out


def summarize(records: Sequence[RequestRecord], duration_s: float, *,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES,
              goodput_limits_ms: dict[str, float] | None = None,
              slos: Sequence[Slo] = ()) -> dict[str, Any]:
    """Every figure of one run. `duration_s`: first arrival to last answer."""
    if duration_s <= 0:
        raise ValueError("duration must be positive")
    done = [r for r in records if r.ok]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    values = {
        "ttft": [r.ttft_s for r in done],
        "tpot": [t for t in (r.tpot_s for r in done) if t is not None],
        "itl": [gap for r in done for gap in r.itls_s],
        "e2el": [r.e2e_s for r in done],
    }
    queue = [r.client_queue_s for r in records if r.ok]
    result: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "latency_ms": {name: distribution_ms(values[name], percentiles) for name in METRICS},
        "client_queue_ms": distribution_ms(queue, percentiles),
        "output_tokens_source": sorted({r.output_tokens_source for r in done}),
        "errors": errors_by_kind(records),
    }
    if goodput_limits_ms:
        good = sum(_request_is_good(r, goodput_limits_ms) for r in done)
        result["goodput_limits_ms"] = dict(goodput_limits_ms)
        result["request_goodput"] = good / duration_s
        result["good_fraction"] = good / len(records) if records else 0.0
    if slos:
        result["slos"] = check_slos(result, slos, values)
    return result


def check_slos(summary: dict[str, Any], slos: Sequence[Slo],
               values_s: dict[str, list[float]]) -> dict[str, Any]:
    """Each SLO with the measured value; `met` only if all hold and no request failed."""
    checks = []
    for slo in slos:
        vals = values_s[slo.metric]
        measured = percentile(vals, slo.percentile) * 1e3 if vals else None
        checks.append({"slo": slo.describe(), "metric": slo.metric, "percentile": slo.percentile,
                       "limit_ms": slo.limit_ms, "measured_ms": measured,
                       "met": measured is not None and measured <= slo.limit_ms})
    met = bool(checks) and all(c["met"] for c in checks) and summary["failed"] == 0 and summary["completed"] > 0
    return {"met": met, "checks": checks}
