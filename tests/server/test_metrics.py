"""/metrics parses with prometheus-client's parser, uses vLLM's names, and its counters move."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from appliance.config import AppConfig, ClientConfig

from .conftest import MODEL, http_request

ENGINE_SERIES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
]


def _scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    response = http_request("GET", base_url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move(serve):
    served = serve(AppConfig(clients=(ClientConfig(name="m", api_key="km", requests_per_minute=2),)))
    model = {"model_name": MODEL}
    before = _scrape(served.base_url)
    for name in ENGINE_SERIES:
        assert (name, tuple(sorted(model.items()))) in before, name

    client = served.client(api_key="km")
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                         extra_body={"ignore_eos": True})
    list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                        stream=True, extra_body={"ignore_eos": True}))
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    except Exception:  # noqa: BLE001 - the third gets 429, counted below
        pass
    after = _scrape(served.base_url)

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert moved("vllm:generation_tokens_total", **model) == 8
    assert moved("vllm:prompt_tokens_total", **model) > 0  # the second prompt may hit the prefix cache
    assert moved("vllm:prefix_cache_queries_total", **model) > 0  # (the engine counts full blocks)
    assert moved("vllm:request_success_total", model_name=MODEL, finished_reason="length") == 2
    for histogram in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                      "vllm:request_queue_time_seconds"):
        assert moved(histogram + "_count", **model) == 2, histogram
    assert moved("vllm:inter_token_latency_seconds_count", **model) == 6  # 3 gaps in each of 2 requests
    assert moved("llm_appliance_client_requests_total", client="m", status="200") == 2
    assert moved("llm_appliance_client_requests_total", client="m", status="429") == 1
    assert moved("llm_appliance_client_rejections_total", client="m", reason="rate_limit_exceeded") == 1
    assert moved("llm_appliance_client_prompt_tokens_total", client="m") == 2 * out.usage.prompt_tokens
    assert moved("llm_appliance_client_generation_tokens_total", client="m") == 8
    assert _value(after, "llm_appliance_engine_alive", **model) == 1
    # Health counters (engine/compile_watch.py, gc_watch.py): present, whole, never moving back.
    for name in ("llm_appliance_kernel_compiles_total", "llm_appliance_engine_gc_long_pauses_total",
                 "llm_appliance_daemon_gc_long_pauses_total"):
        assert (name, tuple(sorted(model.items()))) in after, name
        assert moved(name, **model) >= 0 and float(_value(after, name, **model)).is_integer(), name
    # Steps by how they ran: on CPU every step is eager (two answers of 4 tokens: 4 steps at least);
    # the graph paths are there and stay at 0.
    steps = "llm_appliance_engine_steps_total"
    assert moved(steps, **model, path="eager") >= 4
    for path in ("decode_graph", "cascade_graph", "prefill_graph", "piecewise_graphs"):
        assert (steps, tuple(sorted({**model, "path": path}.items()))) in after, path
        assert _value(after, steps, **model, path=path) == 0, path


def test_a_long_collector_pause_of_the_server_process_is_counted_in_metrics(serve, monkeypatch):
    import gc

    from appliance import gc_watch

    watch = gc_watch.GcPauseWatch("daemon", threshold_s=0.0).install()  # every collection counts as long
    monkeypatch.setattr(gc_watch, "_WATCH", watch)
    try:
        served = serve()
        before = _scrape(served.base_url)
        gc.collect()
        after = _scrape(served.base_url)
    finally:
        watch.uninstall()
    key = ("llm_appliance_daemon_gc_long_pauses_total", (("model_name", MODEL),))
    assert after[key] >= before[key] + 1
