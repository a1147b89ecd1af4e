"""`llm-appliance bench serve` against the real daemon (default model, CPU) at a tiny rate and size:
the JSON and the plots are written and every figure is in range."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import main
from appliance.models.fetch import default_model_dir

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def daemon_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("daemon") / "stderr.log"
    cmd = [sys.executable, "-m", "appliance.cli", "serve", "--port", str(port), "--max-model-len", "512",
           "--set", "engine.cpu_kv_cache_bytes=67108864"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"daemon did not come up:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    cols = run["requests"]["columns"]
    return [dict(zip(cols, row, strict=True)) for row in run["requests"]["rows"]]


def test_random_sweep_against_the_daemon(daemon_url: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["bench", "serve", "--base-url", daemon_url, "--tokenizer", str(default_model_dir()),
                   "--input-len", "24", "--output-len", "4", "--ignore-eos", "--num-prompts", "4",
                   "--rates", "4,inf", "--slo", "p99-ttft:600000", "--goodput", "e2el:600000",
                   "--result-dir", str(tmp_path), "--result-name", "w", "--metrics-interval", "0.2"])
    out = capsys.readouterr().out
    assert status == 0, out
    doc = json.loads((tmp_path / "w.json").read_text())
    assert doc["model"] == "SmolLM2-135M-Instruct" and doc["endpoint"] == "completions"
    assert doc["ignore_eos"] is True and doc["ignore_eos_refused"] is None  # our server takes it
    assert [r["load"]["rate"] for r in doc["runs"]] == [4.0, "inf"]
    for run in doc["runs"]:
        assert (run["completed"], run["failed"], run["errors"]) == (4, 0, {})
        rows = _rows(run)
        # Prompts built to exactly 24 tokens as the server counts them (BOS included, if any).
        assert [r["prompt_tokens"] for r in rows] == [24] * 4
        assert [(r["output_tokens"], r["finish_reason"]) for r in rows] == [(4, "length")] * 4
        assert run["output_tokens_source"] == ["usage"]
        assert run["total_input_tokens"] == 96 and run["total_output_tokens"] == 16
        assert run["output_throughput"] == pytest.approx(16 / run["duration_s"])
        assert run["total_token_throughput"] == pytest.approx(112 / run["duration_s"])
        lat = run["latency_ms"]
        for r in rows:
            assert 0 < r["ttft_ms"] <= r["e2e_ms"] and r["tpot_ms"] > 0
        assert 0 < lat["ttft"]["p50"] <= lat["ttft"]["p99"] <= lat["ttft"]["max"]
        assert lat["itl"]["p50"] > 0 and lat["e2el"]["p50"] >= lat["ttft"]["p50"]
        # ITLs pooled: 3 gaps per 4-token answer unless the server merged tokens into one chunk.
        assert run["slos"]["met"] and run["request_goodput"] == pytest.approx(run["request_throughput"])
        server = run["server_metrics"]
        assert server["exposed_as"]["kv_cache_usage"] == "vllm:kv_cache_usage_perc"
        assert 0 < server["kv_cache_usage"]["max"] <= 1 and server["requests_running"]["max"] >= 1
        assert server["preemptions"] == 0 and server["rejections"] == 0
        gc_pauses = run["client_gc"]  # the client's own collector pauses during the run
        assert gc_pauses["collections"] >= 0 and gc_pauses["max_ms"] <= gc_pauses["total_ms"] + 1e-9
    paced = doc["runs"][0]
    # 4 arrivals at 4 req/s: the last is released at 1 s, so no more than 4 req/s complete.
    assert paced["offered_rate"] == pytest.approx(4.0) and paced["request_throughput"] <= 4.0
    for name in doc["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(doc["plots"]) == ["w-percentiles.png", "w-throughput-latency.png"]
    assert "TTFT p99 ms" in out and "wrote " + str(tmp_path / "w.json") in out


def test_shared_prefix_on_the_chat_endpoint(daemon_url: str, tmp_path: Path) -> None:
    status = main(["bench", "serve", "--base-url", daemon_url, "--tokenizer", str(default_model_dir()),
                   "--endpoint", "chat", "--workload", "shared-prefix", "--prefix-len", "64", "--input-len", "8",
                   "--output-len", "2", "--ignore-eos", "--num-prompts", "3", "--concurrency", "1",
                   "--result-dir", str(tmp_path), "--result-name", "p", "--no-plots", "--no-progress"])
    assert status == 0
    run = json.loads((tmp_path / "p.json").read_text())["runs"][0]
    assert (run["completed"], run["failed"]) == (3, 0)
    rows = _rows(run)
    # Same template, same prefix, unique questions of exact length: every prompt is as long.
    assert len({r["prompt_tokens"] for r in rows}) == 1 and rows[0]["prompt_tokens"] > 64 + 8
    assert run["load"] == {"rate": "inf", "concurrency": 1, "burstiness": 1.0, "arrivals": "all at once"}
    # One at a time: the later requests find the shared prefix in the server's cache.
    assert run["server_metrics"]["prefix_cache_hit_rate"] > 0
