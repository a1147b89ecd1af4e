"""Prometheus metrics with vLLM's names (and a `model_name` label), plus per-client counters.

Engine-wide figures (running/waiting, KV usage, token and prefix-cache totals, preemptions) are
read from `AsyncEngine.stats()` at scrape time by a collector, so the engine thread never touches
prometheus-client. Per-request histograms are observed by the routes on the event loop.
Each app has its own `CollectorRegistry` (several apps can live in one process, e.g. in tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from appliance.engine.async_engine import AsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                      7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                  0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        labels = ["model_name"]
        values = [self._model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    stats.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                    stats.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    stats.kv_cache_usage)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      stats.generation_tokens_total)
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                      stats.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      stats.prefix_cache_hits)
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.",
                      stats.num_preemptions)
        yield gauge("llm_appliance_engine_alive", "1 while the engine loop is alive.",
                    0.0 if self._engine.dead else 1.0)


class ServerMetrics:
    """Everything /metrics exposes for one app."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(engine, model_name))
        reg = self.registry
        m = ["model_name"]
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", m,
            buckets=_LATENCY_BUCKETS_S, registry=reg)
        self.inter_token_latency = Histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", m,
            buckets=_ITL_BUCKETS_S, registry=reg)
        self.e2e_request_latency = Histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", m,
            buckets=_LATENCY_BUCKETS_S, registry=reg)
        self.request_queue_time = Histogram(
            "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", m,
            buckets=_LATENCY_BUCKETS_S, registry=reg)
        self.request_success = Counter(
            "vllm:request_success", "Count of successfully processed requests.", m + ["finished_reason"],
            registry=reg)
        # Our own, per client (the API key's name).
        self.client_requests = Counter(
            "llm_appliance_client_requests", "Requests answered, by client and HTTP status.",
            ["client", "status"], registry=reg)
        self.client_prompt_tokens = Counter(
            "llm_appliance_client_prompt_tokens", "Prompt tokens of admitted requests, by client.",
            ["client"], registry=reg)
        self.client_generation_tokens = Counter(
            "llm_appliance_client_generation_tokens", "Tokens generated, by client.", ["client"], registry=reg)
        self.client_rejections = Counter(
            "llm_appliance_client_rejections", "Requests refused by quotas or the admission queue, by reason.",
            ["client", "reason"], registry=reg)

        # The labelled children, looked up once: observe() runs for every streamed step.
        self._ttft = self.time_to_first_token.labels(model_name)
        self._itl = self.inter_token_latency.labels(model_name)
        self._e2e = self.e2e_request_latency.labels(model_name)
        self._queue = self.request_queue_time.labels(model_name)

    def observe_finished(
        self, *, finish_reasons: list[str], ttft_s: float | None, e2e_s: float, queue_s: float | None
    ) -> None:
        if ttft_s is not None:
            self._ttft.observe(ttft_s)
        self._e2e.observe(e2e_s)
        if queue_s is not None:
            self._queue.observe(queue_s)
        for reason in finish_reasons:
            self.request_success.labels(self.model_name, reason).inc()

    def observe_inter_token(self, seconds_per_token: float, num_tokens: int) -> None:
        for _ in range(num_tokens):
            self._itl.observe(seconds_per_token)

    def render(self) -> bytes:
        return generate_latest(self.registry)
