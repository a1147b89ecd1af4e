"""`python -m appliance_bench.sse_capacity`: the HTTP side alone, loaded at a GPU's pace by a
clock-driven stand-in for the engine process. At a load far under this machine's capacity (16
streams, a step every 20 ms), every stream gets every token and about one event per step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from appliance_bench import sse_capacity


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_sse_capacity_smoke(tmp_path: Path, route: str) -> None:
    out = tmp_path / "sse.json"
    argv = ["--streams", "16", "--step-ms", "20", "--tokens", "24", "--out", str(out)]
    argv += ["--chat"] if route == "chat" else []
    assert sse_capacity.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["route"] == route and result["streams"] == 16
    assert result["output_tok_s"] > 0 and result["engine_steps"] >= 24
    assert result["tokens_total"] == 16 * 24  # every stream's usage: every token arrived
    # (chat: one more event per stream, the role's, so 24 tokens in 25 events at best)
    assert (0.96 if route == "chat" else 1.0) <= result["tokens_per_event"] <= 1.25, result
    assert result["server_cpu_us_per_event"] > 0
