"""bench/crosscheck_server_view.py: each client's requests paired with our daemon's request log, on
hand-made records with known answers (clock offset, transit, the server's service per half)."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import pytest
from appliance_bench import crosscheck_server_view as sv

WALL0 = 1_796_215_000.0  # the log's clock (epoch seconds) at perf_counter 0 + OFFSET
OFFSET = 420.5612
COLUMNS = ["prompt_tokens", "output_tokens", "ttft_ms", "tpot_ms", "e2e_ms", "max_itl_ms", "client_queue_ms",
           "finish_reason", "error_kind", "sent_ms"]


def _log_line(arrival: float, ttft_ms: float, total_ms: float, prompt: int) -> str:
    stamp = dt.datetime.fromtimestamp(int(arrival * 1e3) / 1e3, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    rec = {"time": stamp, "request_id": "x", "status": 200, "stream": True, "prompt_tokens": prompt,
           "completion_tokens": 32, "ttft_s": round(ttft_ms / 1e3, 4), "total_s": round(total_ms / 1e3, 4)}
    return f"2026-12-02 12:00:00,000 INFO appliance.requests: {json.dumps(rec)}"


def _write(tmp: Path, *, vllm_extra_ms: float, ours_service: float) -> None:
    """Two halves of Poisson arrivals at 12 req/s (one workload `p1s`, one round): the server serves
    our half's first tokens `ours_service` times slower; vLLM's client adds `vllm_extra_ms` to
    every TTFT it reports (its E2E stays true)."""
    rng = random.Random(5)
    t = 100.0
    lines = [_log_line(WALL0 + OFFSET + 50.0, 9.0, 500.0, 512)]  # a warm-up nobody sent in the runs
    ours_rows, vllm = [], {"start_times": [], "ttfts": [], "itls": [], "output_lens": [], "input_lens": [],
                           "errors": []}
    for i in range(200):
        t += rng.expovariate(12.0)
        client = "ours" if i % 2 == 0 else "vllm"
        server_ttft = rng.uniform(20, 40) * (ours_service if client == "ours" else 1.0)
        server_total = server_ttft + 31 * 5.0
        transit = rng.uniform(0.2, 0.8) / 1e3
        lines.append(_log_line(WALL0 + OFFSET + t + transit, server_ttft, server_total, 512))
        ttft, e2e = server_ttft + 1.5, server_total + 1.5  # what a client sees: transit both ways
        if client == "ours":
            ours_rows.append([512, 32, ttft, (e2e - ttft) / 31, e2e, 6.0, 0.1, "length", None, (t - 99.0) * 1e3])
        else:
            ttft += vllm_extra_ms  # its first chunk stamped late; the stream's end on time
            vllm["start_times"].append(WALL0 + t - WALL0)
            vllm["ttfts"].append(ttft / 1e3)
            vllm["itls"].append([(e2e - ttft) / 31 / 1e3] * 31)
            vllm["output_lens"].append(32)
            vllm["input_lens"].append(512)
            vllm["errors"].append("")
    (tmp / "serve_x.log").write_text("\n".join(lines) + "\n")
    run = {"clock_origin_s": 99.0, "requests": {"columns": COLUMNS, "rows": ours_rows}}
    (tmp / "p1s_ours_r1.json").write_text(json.dumps({"runs": [run]}))
    (tmp / "p1s_vllm_r1.json").write_text(json.dumps(vllm))


def test_a_slower_half_is_service_not_measurement(tmp_path: Path) -> None:
    _write(tmp_path, vllm_extra_ms=0.0, ours_service=1.1)
    result = sv.server_view(tmp_path)
    assert result["paired"] == result["client_requests"] == 200
    assert result["clock_offset_s"] == pytest.approx(WALL0 + OFFSET, abs=2e-3)
    entry = result["workloads"]["p1s"]
    assert entry["complete"]
    for stat in ("mean", "p50"):
        r = entry["ratios"][f"{stat} ttft"]
        assert r["service"] == pytest.approx(1.1, rel=0.08)  # each half drew its own 100 TTFTs
        assert r["measurement"] == pytest.approx(1.0, abs=0.01)
    assert entry["ratios"]["p50 tpot"]["measurement"] == pytest.approx(1.0, abs=1e-3)  # 5 ms/token both ways
    gap = entry["halves"]["ours"]["ttft"]["client_minus_server"]
    assert gap["p50"] == pytest.approx(1.5, abs=0.06)  # the server log keeps 0.1 ms


def test_a_client_that_adds_time_shows_in_the_measurement(tmp_path: Path) -> None:
    _write(tmp_path, vllm_extra_ms=3.0, ours_service=1.0)
    entry = sv.server_view(tmp_path)["workloads"]["p1s"]
    assert entry["complete"]
    assert entry["ratios"]["mean ttft"]["service"] == pytest.approx(1.0, rel=0.08)
    # Our client sees server + 1.5 ms, vLLM's server + 4.5: its mean TTFT reads ~3 ms more per request.
    vllm_gap = entry["halves"]["vllm"]["ttft"]["client_minus_server"]["mean"]
    assert vllm_gap == pytest.approx(4.5, abs=0.06)
    assert entry["ratios"]["mean ttft"]["measurement"] < 0.93
    # Its TPOT, (E2E - TTFT) / 31, reads 3/31 ms per token short of the server's 5 ms.
    assert entry["ratios"]["mean tpot"]["measurement"] == pytest.approx(5.0 / (5.0 - 3.0 / 31), rel=1e-3)


def test_a_record_whose_end_disagrees_is_not_paired(tmp_path: Path) -> None:
    _write(tmp_path, vllm_extra_ms=0.0, ours_service=1.0)
    log = tmp_path / "serve_x.log"
    lines = log.read_text().splitlines()
    rec = json.loads(lines[1].split("appliance.requests: ", 1)[1])  # our first request's record
    rec["total_s"] += 0.02  # it ended 20 ms after the client's last token: not that request
    lines[1] = lines[1].split("appliance.requests: ", 1)[0] + "appliance.requests: " + json.dumps(rec)
    log.write_text("\n".join(lines) + "\n")
    result = sv.server_view(tmp_path)
    assert result["paired"] == 199
    assert result["workloads"]["p1s"]["halves"]["ours"]["paired"] == 99


def test_no_request_log_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p1s_ours_r1.json").write_text("{}")
    assert sv.main(["--crosscheck", str(tmp_path)]) == 2
    assert "no serve_*.log" in capsys.readouterr().err
