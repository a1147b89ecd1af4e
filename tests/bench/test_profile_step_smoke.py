"""`python -m appliance_bench.profile_step --smoke`: the step profiler on CPU at tiny sizes.

Speed is the GPU run's business; this keeps the harness working: engine instrumentation, the
per-phase times and the JSON record.
"""

from __future__ import annotations

import json
from pathlib import Path

from appliance_bench import profile_step


def test_profile_step_smoke_writes_phases(tmp_path: Path) -> None:
    from appliance.models.fetch import ensure_default_model

    tokenizer = ensure_default_model(progress=False)
    assert profile_step.main(["--smoke", "--keep-steps", "--results-dir", str(tmp_path),
                              "--tokenizer", str(tokenizer)]) == 0
    [path] = tmp_path.glob("*-profile-smoke.json")
    record = json.loads(path.read_text())
    assert record["device"] == "cpu" and record["commit"]
    decode = record["by_kind"]["decode"]
    assert decode["steps"] >= 1 and decode["median_wall_ms"] > 0
    # The phases are measured inside the step: together they cannot exceed it.
    for step in record["steps"]:
        inside = sum(step.get(f"{p}_ms", 0.0) for p in ("schedule", "launch", "process", "outputs"))
        assert 0 < inside <= step["wall_ms"] * 1.01, step
    assert sum(s["seqs"] for s in record["steps"] if s["kind"] == "decode") > 0
    assert record["output_tok_s"] > 0


def test_host_op_table_sums_self_time_per_step() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            x = torch.mm(x, x).tanh_()
    rows = profile_step.host_op_table(prof, num_steps=4, top=10)
    by_op = {row["op"]: row for row in rows}
    assert by_op["aten::mm"]["calls_per_step"] == 1.0 and by_op["aten::mm"]["self_us_per_step"] > 0
    assert rows == sorted(rows, key=lambda r: -r["self_us_per_step"])
