"""`python -m appliance_bench.online --smoke`: offline vs bridge vs HTTP, with both engine clients,
at tiny sizes on the default model (CPU).

Speed is the GPU run's job; this keeps the harness working and checks what it can check on any
machine: every token comes back in every mode, and a streaming client gets about one SSE event
per engine step (tokens per event near 1.0; steps merge only when a client falls behind, which a
loaded CI machine may cause now and then): 8 clients, 8 tokens each.
"""

from __future__ import annotations

import json
from pathlib import Path

from appliance_bench import online


def test_online_smoke_all_modes(tmp_path: Path) -> None:
    out = tmp_path / "online.json"
    assert online.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    modes = ["offline", "bridge", "http", "bridge-process", "http-process"]
    for mode in modes:
        assert result[f"{mode}_output_tok_s"] > 0, mode
    for mode in ("http", "http-process"):
        assert 1.0 <= result[f"{mode}_tokens_per_event"] <= 1.25, result
    for mode in modes[1:]:
        assert result[f"{mode}_over_offline"] > 0
    assert result["device"] == "cpu" and result["num_requests"] == 8
