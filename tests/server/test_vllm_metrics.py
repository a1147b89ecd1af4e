"""Every metric family vLLM exports (name, type, labels), and every series vLLM's published Grafana
dashboard (examples/online_serving/prometheus_grafana/grafana.json) queries returns data after
traffic: its expressions' series exist with our model_name, and the ones under rate()/increase()
move."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.apps_server import apps_served  # noqa: F401 - the shared server fixture
from tests.server.conftest import MODEL, http_request

# metrics are the front end's: the in-process engine is enough.
INLINE_ONLY = pytest.mark.parametrize("engine_and_gate", ["inline"], indirect=True)
pytestmark = [INLINE_ONLY]

# (family, type) as vLLM's Prometheus logger exports them; every one carries model_name.
VLLM_FAMILIES = [
    ("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"),
    ("vllm:kv_cache_usage_perc", "gauge"), ("vllm:gpu_cache_usage_perc", "gauge"),
    ("vllm:cache_config_info", "gauge"),
    ("vllm:prompt_tokens", "counter"), ("vllm:generation_tokens", "counter"), ("vllm:num_preemptions", "counter"),
    ("vllm:prefix_cache_queries", "counter"), ("vllm:prefix_cache_hits", "counter"),
    ("vllm:request_success", "counter"),
    ("vllm:iteration_tokens_total", "histogram"), ("vllm:request_prompt_tokens", "histogram"),
    ("vllm:request_generation_tokens", "histogram"), ("vllm:request_max_num_generation_tokens", "histogram"),
    ("vllm:request_params_n", "histogram"), ("vllm:request_params_max_tokens", "histogram"),
    ("vllm:time_to_first_token_seconds", "histogram"), ("vllm:inter_token_latency_seconds", "histogram"),
    ("vllm:request_time_per_output_token_seconds", "histogram"), ("vllm:time_per_output_token_seconds", "histogram"),
    ("vllm:e2e_request_latency_seconds", "histogram"), ("vllm:request_queue_time_seconds", "histogram"),
    ("vllm:request_inference_time_seconds", "histogram"), ("vllm:request_prefill_time_seconds", "histogram"),
    ("vllm:request_decode_time_seconds", "histogram"),
]

# The series inside the dashboard's panel expressions: (series, wrapped in rate()/increase()).
GRAFANA_SERIES = [
    ("vllm:e2e_request_latency_seconds_bucket", True), ("vllm:e2e_request_latency_seconds_sum", True),
    ("vllm:e2e_request_latency_seconds_count", True), ("vllm:prompt_tokens_total", True),
    ("vllm:generation_tokens_total", True), ("vllm:time_per_output_token_seconds_bucket", True),
    ("vllm:time_per_output_token_seconds_sum", True), ("vllm:time_per_output_token_seconds_count", True),
    ("vllm:num_requests_running", False), ("vllm:num_requests_waiting", False),
    ("vllm:time_to_first_token_seconds_bucket", True), ("vllm:time_to_first_token_seconds_sum", True),
    ("vllm:time_to_first_token_seconds_count", True), ("vllm:gpu_cache_usage_perc", False),
    ("vllm:request_prompt_tokens_bucket", True), ("vllm:request_generation_tokens_bucket", True),
    ("vllm:request_success_total", True), ("vllm:request_queue_time_seconds_sum", True),
    ("vllm:request_prefill_time_seconds_sum", True), ("vllm:request_decode_time_seconds_sum", True),
    ("vllm:request_max_num_generation_tokens_sum", True),
]


def _families(base_url: str) -> dict[str, Any]:
    response = http_request("GET", base_url + "/metrics")
    assert response.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def _totals(families: dict[str, Any]) -> dict[str, float]:
    """series name -> sum over its samples labelled with our model."""
    totals: dict[str, float] = {}
    for family in families.values():
        for sample in family.samples:
            if sample.labels.get("model_name") == MODEL:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def test_vllm_families_and_grafana_panels_have_data(apps_served: Any) -> None:  # noqa: F811
    before = _totals(_families(apps_served.base_url))
    client = apps_served.client()
    for stream in (False, True):
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                             extra_body={"ignore_eos": True}, stream=stream)
        if stream:
            list(out)
    families = _families(apps_served.base_url)
    for name, kind in VLLM_FAMILIES:
        assert name in families, name
        assert families[name].type == kind, (name, families[name].type)
        assert any(s.labels.get("model_name") == MODEL for s in families[name].samples), name
    after = _totals(families)
    for series, moves in GRAFANA_SERIES:
        assert series in after, series
        if moves:
            assert after[series] > before.get(series, 0.0), series
    assert after["vllm:request_generation_tokens_sum"] - before.get("vllm:request_generation_tokens_sum", 0) == 10
    assert after["vllm:iteration_tokens_total_count"] > before.get("vllm:iteration_tokens_total_count", 0)
