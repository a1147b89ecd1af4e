"""Prometheus metrics with vLLM's names (and a `model_name` label), plus per-client counters.

Engine-wide figures (running/waiting, KV usage, token and prefix-cache totals, preemptions) are
read from `AsyncEngine.stats()` at scrape time by a collector, so the engine thread never touches
prometheus-client. Per-request histograms are observed by the routes on the event loop.
Each app has its own `CollectorRegistry` (several apps can live in one process, e.g. in tests).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance import gc_watch

if TYPE_CHECKING:
    from appliance.engine.async_engine import AsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                      7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                  0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
# vLLM's 1-2-5 token buckets up to the largest context we serve (request sizes, max_tokens).
_TOKEN_BUCKETS = tuple(float(m * 10**e) for e in range(0, 7) for m in (1, 2, 5))
_N_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0)
_ITERATION_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0)


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name
        # vllm:iteration_tokens_total from the engine's cumulative counters: each scrape books the
        # steps since the last one at their mean size (the engine keeps no per-step histogram).
        self._last_steps = 0
        self._last_tokens = 0
        self._iteration_buckets = [0] * (len(_ITERATION_BUCKETS) + 1)
        self._iteration_sum = 0.0

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
        # The name vLLM's published Grafana dashboard still queries (deprecated there, same value).
        yield gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.",
                    stats.kv_cache_usage)
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=["model_name", "num_gpu_blocks"])
        info.add_metric([self._model_name, str(stats.num_kv_blocks_total)], 1.0)
        yield info
        yield self._iterations(stats.num_steps, stats.prompt_tokens_total + stats.generation_tokens_total)
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
        yield counter("llm_appliance_kernel_compiles",
                      "Triton kernels compiled after the warm-up: each one held a step (and its requests) "
                      "for the compile.", stats.kernel_compiles)
        paths = CounterMetricFamily("llm_appliance_engine_steps",
                                    "Engine steps launched, by how they ran: decode_graph, cascade_graph, "
                                    "prefill_graph, piecewise_graphs (CUDA graphs), or eager (kernels launched "
                                    "from Python: CPU, enforce_eager, prompt logprobs).",
                                    labels=["model_name", "path"])
        for path, n in stats.steps_by_path.items():
            paths.add_metric([self._model_name, path], n)
        yield paths
        yield counter("llm_appliance_engine_gc_long_pauses",
                      "Garbage-collector pauses of 50 ms or more in the engine's process (inline: the daemon's).",
                      stats.gc_long_pauses)
        yield counter("llm_appliance_daemon_gc_long_pauses",
                      "Garbage-collector pauses of 50 ms or more in the daemon's process (every stream waits).",
                      gc_watch.long_pauses_so_far())

    def _iterations(self, num_steps: int, num_tokens: int) -> HistogramMetricFamily:
        steps, tokens = num_steps - self._last_steps, num_tokens - self._last_tokens
        if steps > 0 and tokens >= 0:
            mean = tokens / steps
            index = next((i for i, bound in enumerate(_ITERATION_BUCKETS) if mean <= bound), len(_ITERATION_BUCKETS))
            self._iteration_buckets[index] += steps
            self._iteration_sum += tokens
        self._last_steps, self._last_tokens = num_steps, num_tokens
        family = HistogramMetricFamily("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                       labels=["model_name"])
        family.add_metric([self._model_name], _cumulative(_ITERATION_BUCKETS, self._iteration_buckets),
                          self._iteration_sum)
        return family


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts (the last one past every bound) as Prometheus' cumulative `le` buckets."""
    cumulative, buckets = 0, []
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
    return buckets


class _LoopHistogram(Collector):
    """A histogram observed only on the event loop, for the figure observed per streamed event.

    prometheus-client's Histogram takes a lock and walks its buckets per observation (~4 us), and
    has no weighted observe: the inter-token latency, observed once per token of every SSE event,
    cost more than the event's JSON. Here one `observe(value, count)` is a bisect and two adds.
    NOTE: not thread-safe; the loop is the only writer and scrapes run on the loop too.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], model_name: str,
                 registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one: +Inf
        self._sum = 0.0
        self._model_name = model_name
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        self._counts[bisect_left(self._bounds, value)] += count
        self._sum += value * count

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=["model_name"])
        family.add_metric([self._model_name], _cumulative(self._bounds, self._counts), self._sum)
        yield family


@dataclass(frozen=True)
class RequestUsage:
    """One finished HTTP request, for the per-request histograms (times: engine monotonic seconds)."""

    prompt_tokens: int
    generation_tokens: list[int]  # per choice
    n: int
    max_tokens: int | None
    first_scheduled_s: float | None
    first_token_s: float | None
    finished_s: float | None


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
        self.inter_token_latency = _LoopHistogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _ITL_BUCKETS_S,
            model_name, reg)
        self.e2e_request_latency = Histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", m,
            buckets=_LATENCY_BUCKETS_S, registry=reg)
        self.request_queue_time = Histogram(
            "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", m,
            buckets=_LATENCY_BUCKETS_S, registry=reg)
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, m, buckets=buckets, registry=reg)

        self.time_per_output_token = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.", _ITL_BUCKETS_S)
        # The deprecated name the Grafana dashboard queries: the same per-request observations.
        self.time_per_output_token_old = histogram(
            "vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", _ITL_BUCKETS_S)
        self.request_inference_time = histogram(
            "vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
            _LATENCY_BUCKETS_S)
        self.request_prefill_time = histogram(
            "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
            _LATENCY_BUCKETS_S)
        self.request_decode_time = histogram(
            "vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
            _LATENCY_BUCKETS_S)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", _TOKEN_BUCKETS)
        self.request_max_num_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.",
            _TOKEN_BUCKETS)
        self.request_params_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.",
                                          _N_BUCKETS)
        self.request_params_max_tokens = histogram(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", _TOKEN_BUCKETS)
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
        self._e2e = self.e2e_request_latency.labels(model_name)
        self._queue = self.request_queue_time.labels(model_name)

    def observe_finished(
        self, *, finish_reasons: list[str], ttft_s: float | None, e2e_s: float, queue_s: float | None,
        usage: RequestUsage | None = None,
    ) -> None:
        if ttft_s is not None:
            self._ttft.observe(ttft_s)
        self._e2e.observe(e2e_s)
        if queue_s is not None:
            self._queue.observe(queue_s)
        for reason in finish_reasons:
            self.request_success.labels(self.model_name, reason).inc()
        if usage is not None:
            self._observe_usage(usage, ttft_s, e2e_s)

    def _observe_usage(self, usage: RequestUsage, ttft_s: float | None, e2e_s: float) -> None:
        name = self.model_name
        self.request_prompt_tokens.labels(name).observe(usage.prompt_tokens)
        self.request_generation_tokens.labels(name).observe(sum(usage.generation_tokens))
        self.request_max_num_generation_tokens.labels(name).observe(max(usage.generation_tokens, default=0))
        self.request_params_n.labels(name).observe(usage.n)
        if usage.max_tokens is not None:
            self.request_params_max_tokens.labels(name).observe(usage.max_tokens)
        most = max(usage.generation_tokens, default=0)
        if ttft_s is not None and most > 1:
            tpot_s = max(e2e_s - ttft_s, 0.0) / (most - 1)
            self.time_per_output_token.labels(name).observe(tpot_s)
            self.time_per_output_token_old.labels(name).observe(tpot_s)
        if usage.first_scheduled_s is not None and usage.finished_s is not None:
            self.request_inference_time.labels(name).observe(max(usage.finished_s - usage.first_scheduled_s, 0.0))
            if usage.first_token_s is not None:
                self.request_prefill_time.labels(name).observe(max(usage.first_token_s - usage.first_scheduled_s, 0.0))
                self.request_decode_time.labels(name).observe(max(usage.finished_s - usage.first_token_s, 0.0))

    def observe_inter_token(self, seconds_per_token: float, num_tokens: int) -> None:
        """Called on the event loop only (per streamed event)."""
        self.inter_token_latency.observe(seconds_per_token, num_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
