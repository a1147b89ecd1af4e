"""`python -m appliance_bench.step_host_time --offline`: the offline W1 host-time bench on CPU at
tiny sizes, through a child process on this checkout (the path `--trees` takes for older ones).

Speed is not checked here (no timed tests in CI); this keeps the harness working: the phases it
times exist in the engine, they add up to the step, and the run and the GC record are written.
"""

from __future__ import annotations

import json
from pathlib import Path

from appliance_bench import step_host_time

REPO = Path(__file__).resolve().parents[2]


def test_offline_w1_records_phases(tmp_path: Path) -> None:
    from appliance.models.fetch import ensure_default_model

    tokenizer = ensure_default_model(progress=False)
    step_host_time.main(["--offline", "--trees", f"here={REPO}", "--repeats", "1", "--requests", "8",
                         "--prompt-tokens", "40", "--output-tokens", "12", "--kv-blocks", "128",
                         "--tokenizer", str(tokenizer), "--results-dir", str(tmp_path)])
    [path] = tmp_path.glob("*-host-offline-w1.json")
    record = json.loads(path.read_text())
    assert record["device"] == "cpu" and record["commit"]
    [run] = record["runs"]["here"]
    assert run["steps"] >= 12 and run["host_s"] > 0 and run["device_s"] > 0
    assert len(run["gc_collections"]) == 3
    step = run["decode_step_ms"]
    # Every phase is found in this tree's engine (a renamed method would read 0 here) ...
    for phase in ("schedule", "launch", "update", "output", "after_launch", "device"):
        assert step[phase] > 0, (phase, step)
    # ... and the host phases are parts of the step, the step part of the caller's loop.
    parts = sum(step[p] for p in ("schedule", "launch", "update", "output", "after_launch"))
    assert parts <= step["host"] * 1.01 and step["step"] <= step["loop"] * 1.01, step
    assert record["summary"]["here"]["median_decode_step_host_ms"] == step["host"]
