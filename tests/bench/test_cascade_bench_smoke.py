"""bench/cascade.py at tiny shapes on CPU (Triton interpreter; the engine part with tiny-llama): the
GPU command cannot rot, and its output checks must pass (speed is not measured here)."""

from __future__ import annotations

import json

from appliance_bench import cascade


def test_cascade_bench_smoke_times_both_paths_and_checks_outputs(tmp_path, capsys) -> None:
    path = tmp_path / "cascade.json"
    assert cascade.main(["--smoke", "--engine", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["outputs_match"] and result["smoke"]
    (row,) = result["timings"]
    assert row["plain_ms"] > 0 and row["cascade_ms"] > 0 and row["max_rel_err"] < 1e-4
    assert row["cascade_min_gb"] < row["plain_min_gb"]
    assert "cascade ms" in capsys.readouterr().out
    engine = result["engine"]  # tiny-llama on CPU: the same workload's shape, scaled down
    assert engine["auto"]["cascade_steps"] > 0 and engine["off"]["cascade_steps"] == 0
    assert engine["same_greedy_tokens"] == "12/12"
