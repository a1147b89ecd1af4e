"""The capacity search against a simulated server of known capacity, and the search alone."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.benchserve import capacity
from appliance.cli import main


def _conversations(path: Path, n: int, fail_every: int = 0) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            text = "please fail" if fail_every and i % fail_every == fail_every - 1 else f"question {i}?"
            f.write(json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4}) + "\n")
    return path


def test_capacity_search_finds_the_simulated_servers_limit(sim: Any, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """An M/D/1 server of service time S holds p90 TTFT <= 6 S up to ~0.9 of its 1/S capacity with
    4 s Poisson probes: simulating the queue (200 seeds, up to 30 ms of client jitter), a probe
    passes with probability 0.96 at 0.7/S, 0.59 at 0.9/S, 0.16 at 1/S and 0.005 at 1.1/S. The
    answer must land between 0.6/S and 1.1/S."""
    data = _conversations(tmp_path / "conv.jsonl", 200)
    service_ms, capacity_rps = sim.service_ms, sim.capacity_rps
    status = main(["bench", "serve", "--base-url", sim.url, "--model", "sim", "--endpoint", "chat",
                   "--workload", "chat", "--dataset", str(data), "--num-prompts", "30",
                   "--capacity", "--slo", f"p90-ttft:{6 * service_ms}", "--capacity-start", "10",
                   "--capacity-seconds", "4", "--capacity-tolerance", "0.08", "--result-dir", str(tmp_path),
                   "--result-name", "cap", "--no-progress", "--metrics-interval", "0.2"])
    out = capsys.readouterr().out
    assert status == 0, out
    result = json.loads((tmp_path / "cap.json").read_text())["capacity"]
    found = result["capacity_rate"]
    assert found is not None and 0.6 * capacity_rps <= found <= 1.1 * capacity_rps, (found, out)
    assert result["status"] == "converged"
    assert result["lowest_failing_rate"] > found
    line = [ln for ln in out.splitlines() if ln.startswith("serves ")]
    assert line == [result["answer"]]
    assert f"serves {found:.3g} req/s with p90 TTFT \u2264 {6 * service_ms:g} ms" in line[0]
    # Every probe ran at its rate, and the server's queue was seen growing past capacity.
    for probe in result["probes"]:
        run = probe["run"]
        assert run["failed"] == 0 and run["load"]["rate"] == probe["rate"]
        assert run["server_metrics"]["exposed_as"]["requests_waiting"] == "vllm:num_requests_waiting"
    busiest = max(result["probes"], key=lambda p: p["rate"])["run"]["server_metrics"]
    assert busiest["requests_waiting"]["max"] >= 2 and busiest["preemptions"] == 0
    assert (tmp_path / "cap-capacity.png").stat().st_size > 0


def test_errors_are_kept_by_kind_with_the_servers_message(sim: Any, tmp_path: Path) -> None:
    data = _conversations(tmp_path / "conv.jsonl", 12, fail_every=4)
    status = main(["bench", "serve", "--base-url", sim.url, "--endpoint", "chat", "--workload", "chat",
                   "--dataset", str(data), "--num-prompts", "12", "--concurrency", "3", "--warmup", "0",
                   "--api-key", "sk-bench-secret",
                   "--goodput", "ttft:1000", "--result-dir", str(tmp_path), "--result-name", "err", "--no-plots",
                   "--no-progress"])
    assert status == 0
    doc = json.loads((tmp_path / "err.json").read_text())
    assert doc["model"] == "sim"  # from GET /v1/models
    # The key is sent (the simulated server ignores it) but never written down.
    assert doc["args"]["concurrency"] == "3" and doc["args"]["api_key"] == "(set)"
    assert "sk-bench-secret" not in (tmp_path / "err.json").read_text()
    run = doc["runs"][0]
    assert (run["completed"], run["failed"]) == (9, 3)
    assert run["errors"] == {"http_400": {"count": 3, "messages": {"simulated failure": 3}, "other_messages": 0}}
    assert run["total_output_tokens"] == 9 * 4 and run["output_tokens_source"] == ["usage"]
    # Goodput counts only completed requests within the limit; the SLO-free run has no "slos".
    assert run["request_goodput"] <= run["request_throughput"] and "slos" not in run


def test_search_brackets_then_bisects_to_the_threshold() -> None:
    """The search alone, on a pass/fail rule with a known threshold."""
    threshold = 37.3
    seen: list[float] = []

    async def probe(rate: float) -> dict:
        seen.append(rate)
        return {"slos": {"met": rate <= threshold}}

    result = asyncio.run(capacity.search(probe, capacity.CapacitySearch(start_rate=1.0, tolerance=0.01)))
    assert result["status"] == "converged"
    assert threshold / 1.01 <= result["capacity_rate"] <= threshold < result["lowest_failing_rate"]
    assert seen[:7] == [1, 2, 4, 8, 16, 32, 64]

    too_slow = asyncio.run(capacity.search(probe, capacity.CapacitySearch(start_rate=100.0, min_rate=50.0)))
    assert too_slow["capacity_rate"] is None and too_slow["status"] == "below_min_rate"
    fast = asyncio.run(capacity.search(probe, capacity.CapacitySearch(start_rate=1.0, max_rate=20.0)))
    assert fast["capacity_rate"] == 20.0 and fast["status"] == "at_least_max_rate"


def test_timeouts_are_an_error_kind(sim: Any, tmp_path: Path) -> None:
    """Every answer takes at least S (50 ms): a 10 ms limit times every request out; the result
    (and its plots, with no latency to draw) is still written, and the exit status says nothing completed."""
    data = _conversations(tmp_path / "conv.jsonl", 3)
    status = main(["bench", "serve", "--base-url", sim.url, "--model", "sim", "--endpoint", "chat",
                   "--workload", "chat", "--dataset", str(data), "--warmup", "0", "--request-timeout", "0.01",
                   "--result-dir", str(tmp_path), "--result-name", "t", "--no-progress"])
    assert status == 1
    doc = json.loads((tmp_path / "t.json").read_text())
    run = doc["runs"][0]
    assert run["completed"] == 0 and run["errors"]["timeout"]["count"] == 3
    assert run["errors"]["timeout"]["messages"] == {"no answer within 0.01 s": 3}
    assert run["latency_ms"]["ttft"]["p99"] is None and len(doc["plots"]) == 2


def test_ignore_eos_only_where_the_server_takes_it(sim: Any, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = _conversations(tmp_path / "conv.jsonl", 3)
    status = main(["bench", "serve", "--base-url", sim.url, "--model", "strict", "--endpoint", "chat",
                   "--workload", "chat", "--dataset", str(data), "--ignore-eos", "--result-dir", str(tmp_path),
                   "--result-name", "s", "--no-plots", "--no-progress"])
    assert status == 0
    assert "the server refused ignore_eos" in capsys.readouterr().err
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["ignore_eos"] is False
    assert doc["ignore_eos_refused"] == "Unrecognized request argument supplied: ignore_eos"
    assert doc["runs"][0]["completed"] == 3 and doc["runs"][0]["failed"] == 0


def test_the_client_honours_the_proxy_environment_as_vllms_does(sim: Any, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Like `vllm bench serve` (aiohttp trust_env): HTTP_PROXY routes the requests (here to a port
    nothing listens on, so each fails as a connection error) unless NO_PROXY names the host."""
    data = _conversations(tmp_path / "conv.jsonl", 4)
    args = ["bench", "serve", "--base-url", sim.url, "--model", "sim", "--endpoint", "chat", "--workload", "chat",
            "--dataset", str(data), "--num-prompts", "4", "--concurrency", "2", "--warmup", "0", "--no-plots",
            "--no-progress", "--no-server-metrics", "--result-dir", str(tmp_path)]
    for var in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # discard: closed
    assert main([*args, "--result-name", "proxied"]) == 1  # nothing completed
    run = json.loads((tmp_path / "proxied.json").read_text())["runs"][0]
    assert (run["completed"], run["failed"]) == (0, 4) and list(run["errors"]) == ["connection"]
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert main([*args, "--result-name", "direct"]) == 0
    run = json.loads((tmp_path / "direct.json").read_text())["runs"][0]
    assert (run["completed"], run["failed"]) == (4, 0)


def test_save_itls_keeps_every_gap_of_every_request(sim: Any, tmp_path: Path) -> None:
    """--save-itls (as vLLM's --save-detailed): each request's gaps between token chunks, in ms;
    their pooled percentiles are the run's ITL figures."""
    data = _conversations(tmp_path / "conv.jsonl", 6)
    assert main(["bench", "serve", "--base-url", sim.url, "--model", "sim", "--endpoint", "chat", "--workload", "chat",
                 "--dataset", str(data), "--num-prompts", "6", "--concurrency", "2", "--warmup", "0", "--no-plots",
                 "--no-progress", "--no-server-metrics", "--save-itls", "--percentiles", "50,99",
                 "--result-dir", str(tmp_path), "--result-name", "itls"]) == 0
    run = json.loads((tmp_path / "itls.json").read_text())["runs"][0]
    gaps = run["itls_ms"]
    assert len(gaps) == 6 and all(len(g) == run["requests"]["rows"][i][1] - 1 for i, g in enumerate(gaps))
    pooled = sorted(x for g in gaps for x in g)
    assert run["latency_ms"]["itl"]["p50"] == pytest.approx(float(np.percentile(pooled, 50)), abs=1e-3)
    assert all(max(g) == pytest.approx(row[5], abs=1e-3) for g, row in zip(gaps, run["requests"]["rows"], strict=True))
