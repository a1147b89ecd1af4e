"""bench/structured.py --smoke: the constrained-TPOT and compile-time benchmark end to end at tiny
sizes on CPU (speed is the GPU run's job; this keeps the harness working)."""

from __future__ import annotations

import json
from pathlib import Path

from appliance_bench import structured


def test_structured_bench_smoke_writes_both_runs_and_compile_times(tmp_path: Path) -> None:
    out = tmp_path / "structured.json"
    assert structured.main(["--smoke", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["batch"] == 4 and record["commit"]
    for kind in ("unconstrained", "json_schema", "json_schema_threaded_fill"):
        [run] = record["runs"][kind]
        assert run["output_tokens"] == 4 * 6 and run["tpot_ms_mean"] > 0
    compile_times = record["compile"]
    assert 0 < compile_times["compile_cached_ms_median"] and 0 < compile_times["compile_cold_ms_median"]
