"""The benchmark's arithmetic on synthetic timestamps with answers worked out by hand, the arrival
schedules, and the SSE parsing of the client."""

from __future__ import annotations

import math
import statistics

import pytest

from appliance.benchserve import arrivals, metrics
from appliance.benchserve.client import _SSEBuffer
from appliance.benchserve.record import RequestRecord


def rec(index: int, start: float, times: list[float], out: int, prompt: int = 10, due: float | None = None,
        error: str | None = None, message: str = "") -> RequestRecord:
    return RequestRecord(index=index, due_s=start if due is None else due, start_s=start, token_times_s=times,
                         output_tokens=out, output_tokens_source="usage", prompt_tokens=prompt,
                         error_kind=error, error_message=message)


# Request 0: sent at 100.0, chunks at 100.2, 100.3, 100.5, 100.6 carrying 5 tokens (one chunk held 2).
#   TTFT 200 ms, E2E 600 ms, ITLs 100/200/100 ms, TPOT (600 - 200) / (5 - 1) = 100 ms.
# Request 1: sent at 100.1 (due at 100.0: 100 ms in the client's queue), chunks 100.5, 100.6, 100.7.
#   TTFT 400 ms, E2E 600 ms, ITLs 100/100 ms, TPOT (600 - 400) / 2 = 100 ms.
# Request 2: one token at 101.0 (sent 100.2): TTFT = E2E = 800 ms, no ITL, no TPOT.
# Request 3: failed (HTTP 429).
RECORDS = [
    rec(0, 100.0, [100.2, 100.3, 100.5, 100.6], out=5, prompt=10),
    rec(1, 100.1, [100.5, 100.6, 100.7], out=3, prompt=20, due=100.0),
    rec(2, 100.2, [101.0], out=1, prompt=30),
    rec(3, 100.3, [], out=0, prompt=40, error="http_429", message="queue full"),
]


def test_per_request_figures() -> None:
    r0, r1, r2 = RECORDS[:3]
    assert r0.ttft_s == pytest.approx(0.2) and r0.e2e_s == pytest.approx(0.6)
    assert r0.itls_s == pytest.approx([0.1, 0.2, 0.1])
    assert r0.tpot_s == pytest.approx(0.1)
    assert r1.ttft_s == pytest.approx(0.4) and r1.tpot_s == pytest.approx(0.1)
    assert r1.client_queue_s == pytest.approx(0.1)
    assert r2.tpot_s is None and r2.itls_s == [] and r2.ttft_s == pytest.approx(r2.e2e_s)


def test_summary_of_a_run() -> None:
    s = metrics.summarize(RECORDS, duration_s=2.0, percentiles=(50, 90, 99))
    assert (s["completed"], s["failed"]) == (3, 1)
    # Failed requests count in neither tokens nor throughput.
    assert s["total_input_tokens"] == 60 and s["total_output_tokens"] == 9
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(4.5)
    assert s["total_token_throughput"] == pytest.approx(34.5)
    ttft = s["latency_ms"]["ttft"]  # 200, 400, 800
    assert ttft["mean"] == pytest.approx(1400 / 3)
    assert ttft["p50"] == pytest.approx(400)
    assert ttft["p90"] == pytest.approx(400 + 0.8 * 400)  # rank 1.8 between 400 and 800
    assert ttft["p99"] == pytest.approx(400 + 0.98 * 400)
    assert ttft["max"] == pytest.approx(800)
    assert ttft["std"] == pytest.approx(statistics.pstdev([200, 400, 800]))
    itl = s["latency_ms"]["itl"]  # every gap pooled: 100, 200, 100, 100, 100
    assert itl["mean"] == pytest.approx(120) and itl["p50"] == pytest.approx(100)
    assert itl["p90"] == pytest.approx(100 + 0.6 * 100)  # rank 3.6 of [100, 100, 100, 100, 200]
    tpot = s["latency_ms"]["tpot"]  # the single-token request has none
    assert tpot["mean"] == pytest.approx(100) and tpot["p99"] == pytest.approx(100)
    assert s["latency_ms"]["e2el"]["p50"] == pytest.approx(600)
    assert s["client_queue_ms"]["max"] == pytest.approx(100)
    assert s["errors"] == {"http_429": {"count": 1, "messages": {"queue full": 1}, "other_messages": 0}}


def test_goodput_and_slos() -> None:
    limits = metrics.parse_goodput(["ttft:500", "tpot:150"])
    assert limits == {"ttft": 500.0, "tpot": 150.0}
    s = metrics.summarize(RECORDS, 2.0, goodput_limits_ms=limits)
    # Requests 0 and 1 meet both; request 2's TTFT (800 ms) does not; 3 failed.
    assert s["request_goodput"] == pytest.approx(1.0) and s["good_fraction"] == pytest.approx(0.5)
    # A single-token answer counts as TPOT 0 for goodput (vLLM's rule).
    s = metrics.summarize(RECORDS[:3], 2.0, goodput_limits_ms={"tpot": 50.0})
    assert s["request_goodput"] == pytest.approx(0.5)
    # The worst gap of a request is its ITL for goodput: request 0 has a 200 ms gap.
    s = metrics.summarize(RECORDS[:3], 2.0, goodput_limits_ms={"itl": 150.0})
    assert s["request_goodput"] == pytest.approx(1.0)

    slos = metrics.parse_slos(["p50-ttft:450,itl:250", "p90_e2e:700"])
    assert [(x.metric, x.percentile, x.limit_ms) for x in slos] == [
        ("ttft", 50.0, 450.0), ("itl", 99.0, 250.0), ("e2el", 90.0, 700.0)]
    ok = metrics.summarize(RECORDS[:3], 2.0, slos=slos)["slos"]
    # p90 E2E over 600, 600, 800 is 760 ms > 700.
    assert [c["met"] for c in ok["checks"]] == [True, True, False] and not ok["met"]
    assert ok["checks"][2]["measured_ms"] == pytest.approx(760)
    met = metrics.summarize(RECORDS[:3], 2.0, slos=metrics.parse_slos(["p50-ttft:450"]))["slos"]
    assert met["met"]
    # Any failed request fails the run, whatever the percentiles.
    assert not metrics.summarize(RECORDS, 2.0, slos=metrics.parse_slos(["p50-ttft:450"]))["slos"]["met"]
    assert slos[0].describe() == "p50 TTFT \u2264 450 ms"
    for bad in ("ttft", "p99-foo:3", "ttft:-1", "p0-ttft:5"):
        with pytest.raises(ValueError):
            metrics.parse_slos([bad])


def test_percentile_matches_numpy_linear() -> None:
    values = [float(v) for v in range(1, 101)]
    assert metrics.percentile(values, 50) == pytest.approx(50.5)
    assert metrics.percentile(values, 99) == pytest.approx(99.01)
    assert metrics.percentile([3.0], 99) == 3.0
    assert metrics.percentile_key(99.9) == "p99.9" and metrics.percentile_key(50.0) == "p50"
    with pytest.raises(ValueError):
        metrics.percentile([], 50)


def test_arrival_schedules() -> None:
    assert arrivals.schedule_s(5, math.inf) == [0.0] * 5
    poisson = arrivals.schedule_s(2000, 20.0, 1.0, seed=3)
    assert poisson == sorted(poisson)
    assert poisson[-1] == pytest.approx(2000 / 20.0)  # scaled to exactly N / rate
    gaps = [b - a for a, b in zip([0.0, *poisson], poisson, strict=False)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.05)
    cv = statistics.pstdev(gaps) / mean  # exponential gaps: coefficient of variation 1
    assert 0.9 < cv < 1.1
    regular = arrivals.schedule_s(2000, 20.0, 16.0, seed=3)  # gamma shape 16: cv 1/4
    rgaps = [b - a for a, b in zip([0.0, *regular], regular, strict=False)]
    assert 0.2 < statistics.pstdev(rgaps) / statistics.fmean(rgaps) < 0.3
    assert arrivals.schedule_s(10, 5.0, seed=1) == arrivals.schedule_s(10, 5.0, seed=1)
    assert arrivals.schedule_s(10, 5.0, seed=1) != arrivals.schedule_s(10, 5.0, seed=2)
    with pytest.raises(ValueError):
        arrivals.parse_rate("0")


def test_sse_buffer_splits_events_across_reads() -> None:
    sse = _SSEBuffer()
    assert sse.feed(b'data: {"a": 1}\n\ndata: {"b"') == ['{"a": 1}']
    assert sse.feed(b': 2}\r\n\r\n: ping\n\ndata: [DONE]\n\n') == ['{"b": 2}', "[DONE]"]
    # A multi-byte character split between reads.
    snowman = 'data: "\u2603"\n\n'.encode()
    assert sse.feed(snowman[:8]) == [] and sse.feed(snowman[8:]) == ['"\u2603"']
    assert sse.feed(b"data: [DONE]") == [] and sse.rest() == ["[DONE]"]


EXPOSITION = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
vllm:num_requests_running{model_name="n {odd} name"} 2.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 4.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 5.0
vllm:time_to_first_token_seconds_count{model_name="m"} 5.0
vllm:time_to_first_token_seconds_sum{model_name="m"} 0.7
# HELP vllm:num_preemptions Cumulative number of preemptions.
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{model_name="m"} 7.0
vllm:num_preemptions_created{model_name="m"} 1.7e+09
# HELP llm_appliance_client_rejections Requests refused at admission, per client.
# TYPE llm_appliance_client_rejections counter
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.25
"""


def test_a_scrape_reads_only_the_families_it_needs() -> None:
    """The sampler parses on the event loop that stamps chunks: it cuts the text to the families
    it reads first, with the same values as parsing it all."""
    from appliance.benchserve.server_metrics import WANTED, keep_families, parse

    full = parse(EXPOSITION)
    assert full["vllm:time_to_first_token_seconds"] == 0.0  # histograms: the family, no samples
    wanted = parse(EXPOSITION, WANTED)
    assert wanted == {k: v for k, v in full.items() if k in WANTED}
    assert wanted == {"vllm:num_requests_running": 5.0, "vllm:num_preemptions": 7.0,
                      "llm_appliance_client_rejections": 0.0, "vllm:kv_cache_usage_perc": 0.25}
    assert "time_to_first_token" not in keep_families(EXPOSITION, WANTED)
