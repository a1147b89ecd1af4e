"""`llm-appliance bench serve` refuses contradictory flags and reports an unreachable server plainly."""

from __future__ import annotations

import socket

import pytest

from appliance.cli import main


@pytest.mark.parametrize(("args", "message"), [
    (["--rate", "2", "--rates", "1,2"], "give --rate or --rates, not both"),
    (["--capacity"], "--capacity needs at least one --slo"),
    (["--capacity", "--slo", "ttft:500", "--rates", "1"], "--capacity chooses the rates itself"),
    (["--prefix-len", "64"], "--prefix-len is for --workload shared-prefix"),
    (["--workload", "chat"], "use --endpoint chat"),
    (["--slo", "p99-nope:5"], "unknown metric 'nope'"),
    (["--goodput", "ttft"], "expected METRIC:MILLISECONDS"),
    (["--input-len", "9:8"], "--input-len '9:8'"),
    (["--concurrency", "0"], "--concurrency values must be >= 1"),
    (["--percentiles", "50,120"], "each in (0, 100]"),
    (["--request-timeout", "0"], "--request-timeout must be positive"),
])
def test_bad_flags(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9", *args]) == 2
    assert message in capsys.readouterr().err


def test_unreachable_server(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "c.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}\n')
    status = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--endpoint", "chat",
                   "--workload", "chat", "--dataset", str(data), "--result-dir", str(tmp_path)])
    assert status == 1
    err = capsys.readouterr().err
    assert "warm-up request failed (connection)" in err and str(port) in err
    assert not list(tmp_path.glob("*serve.json"))
