"""bench/compare_bench_serve.py: our result against a vLLM result file (vLLM's key names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from appliance_bench.compare_bench_serve import main

from appliance.benchserve import metrics
from appliance.benchserve.record import RequestRecord


def _ours(tmp_path: Path) -> Path:
    records = [RequestRecord(index=i, due_s=0.0, start_s=0.0, token_times_s=[0.1 * (i + 1), 0.1 * (i + 1) + 0.05],
                             output_tokens=2, output_tokens_source="usage", prompt_tokens=8) for i in range(4)]
    run = metrics.summarize(records, duration_s=1.0)
    path = tmp_path / "ours.json"
    path.write_text(json.dumps({"runs": [run]}))
    return path


def _vllm(tmp_path: Path, scale: float) -> Path:
    # vLLM's names: p50 is `median_*`, p99 `p99_*`; TTFTs 100..400 ms -> median 250, p99 397.
    doc = {"completed": 4, "failed": 0, "total_input_tokens": 32, "total_output_tokens": 8,
           "request_throughput": 4.0 * scale, "output_throughput": 8.0, "total_token_throughput": 40.0,
           "median_ttft_ms": 250.0, "p99_ttft_ms": 397.0, "median_tpot_ms": 50.0, "p99_tpot_ms": 50.0,
           "median_itl_ms": 50.0, "p99_itl_ms": 50.0}
    path = tmp_path / "vllm.json"
    path.write_text(json.dumps(doc))
    return path


def test_ratios_within_and_outside_the_tolerance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ours = _ours(tmp_path)
    out_json = tmp_path / "cmp.json"
    assert main([str(ours), str(_vllm(tmp_path, 1.0)), "--json", str(out_json)]) == 0
    assert "9/9 figures within 3%" in capsys.readouterr().out
    rows = {r["figure"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert rows["p99 TTFT (ms)"]["ratio"] == pytest.approx(1.0)
    assert rows["completed"]["ours"] == 4 and rows["completed"]["ratio"] is None
    # vLLM 5% faster in request throughput: that figure is off, the exit status says so.
    assert main([str(ours), str(_vllm(tmp_path, 1.05))]) == 1
    out = capsys.readouterr().out
    assert "8/9 figures within 3%; off: request throughput (req/s)" in out
    with pytest.raises(ValueError, match="1 run"):
        main([str(ours), str(_vllm(tmp_path, 1.0)), "--run", "3"])


def test_medians_over_repeats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ours = _ours(tmp_path)
    runs = []
    for i, scale in enumerate((0.5, 1.0, 1.01)):  # median 1.0: one bad repeat does not decide it
        (tmp_path / f"v{i}").mkdir()
        runs.append(str(_vllm(tmp_path / f"v{i}", scale)))
    assert main(["--ours", str(ours), str(ours), "--vllm", *runs]) == 0
    assert "(medians over the files)" in capsys.readouterr().out
