"""bench/serve_pairs.py on recorded-shape results with known medians and ratios."""

from __future__ import annotations

import json
from pathlib import Path

from appliance_bench import serve_pairs


def _write(folder: Path, name: str, **figures: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"failed": 0, **figures}))


def test_medians_ratios_and_targets(tmp_path: Path) -> None:
    for i, (tput, ttft) in enumerate([(100.0, 10.0), (120.0, 14.0), (110.0, 12.0)]):
        _write(tmp_path / f"o{i}", "w1_ours.json", output_throughput=tput, median_ttft_ms=ttft)
        _write(tmp_path / f"o{i}", "c1_ours.json", median_ttft_ms=ttft, median_tpot_ms=5.0, median_itl_ms=5.2)
    for i, tput in enumerate([90.0, 100.0]):
        _write(tmp_path / f"v{i}", "w1_vllm.json", output_throughput=tput, median_ttft_ms=20.0)
        _write(tmp_path / f"v{i}", "c1_vllm.json", median_ttft_ms=20.0, median_tpot_ms=5.0, median_itl_ms=5.0)
    out = tmp_path / "pairs.json"
    serve_pairs.main(["--ours", *(str(tmp_path / f"o{i}") for i in range(3)),
                      "--vllm", *(str(tmp_path / f"v{i}") for i in range(2)), "--out", str(out)])
    result = json.loads(out.read_text())
    w1 = result["workloads"]["w1"]
    assert w1["ours"]["output_throughput"]["median"] == 110.0
    assert w1["vllm"]["output_throughput"]["median"] == 95.0
    assert abs(w1["ours_over_vllm"]["output_throughput"] - 110.0 / 95.0) < 1e-12
    assert w1["ours_over_vllm"]["median_ttft_ms"] == 0.6
    assert result["targets"]["w1_output_throughput >= 1.15x vLLM"] is True
    assert result["targets"]["c1 median_ttft_ms <= 0.9x vLLM"] is True
    assert result["targets"]["c1 ITL p50 <= 1.1x TPOT p50 (ours)"] is True
    assert "prefix" not in result["workloads"]
