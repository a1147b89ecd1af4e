"""The request log: one JSON line per request, and never the private text unless turned on."""

from __future__ import annotations

import json
import logging

import openai
import pytest

from appliance.config import AppConfig, ClientConfig, LoggingConfig

from .conftest import MODEL

CANARY = "zebra-canary-7f3a91"


def _requests_with_canary(served) -> None:
    client = served.client(api_key="kc")
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Say {CANARY}"}],
                                   max_tokens=2)
    list(client.chat.completions.create(model=MODEL, stream=True, max_tokens=2,
                                        messages=[{"role": "user", "content": f"Repeat {CANARY} {CANARY}"}]))
    client.completions.create(model=MODEL, prompt=f"{CANARY} {CANARY}", max_tokens=2, echo=True)
    # Errors whose messages could quote the request: an unknown role, an unknown model.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": CANARY, "content": CANARY}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=CANARY, messages=[{"role": "user", "content": CANARY}])


def test_canary_never_logged(serve, tmp_path, caplog, capfd):
    log_path = tmp_path / "requests.jsonl"
    served = serve(AppConfig(clients=(ClientConfig(name="canary-app", api_key="kc"),),
                             logging=LoggingConfig(request_log_path=str(log_path))))
    with caplog.at_level(logging.DEBUG):
        _requests_with_canary(served)
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(lines) == 5
    assert [line["status"] for line in lines] == [200, 200, 200, 400, 404]
    assert all(line["client"] == "canary-app" and line["request_id"] for line in lines)
    assert lines[0]["route"] == "/v1/chat/completions" and lines[0]["completion_tokens"] == 2
    assert lines[0]["prompt_tokens"] > 0 and lines[0]["finish_reason"] == "length" and lines[0]["ttft_s"] > 0
    assert lines[3]["error_type"] == "invalid_request_error"
    assert "prompt" not in lines[0] and "output" not in lines[0]
    out, err = capfd.readouterr()
    # The client libraries' own DEBUG records echo what this test sent (openai 3.3 logs request
    # options): only the server's records count.
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("openai", "httpx", "httpcore")))
    for where, text in {"log file": log_path.read_text(), "log records": ours,
                        "stdout": out, "stderr": err}.items():
        assert CANARY not in text, where


def test_text_is_logged_only_when_turned_on(serve, tmp_path):
    log_path = tmp_path / "requests.jsonl"
    served = serve(AppConfig(clients=(ClientConfig(name="canary-app", api_key="kc"),),
                             logging=LoggingConfig(request_log_path=str(log_path), log_request_text=True)))
    served.client(api_key="kc").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Say {CANARY}"}], max_tokens=2)
    line = json.loads(log_path.read_text())
    assert CANARY in json.dumps(line["prompt"]) and isinstance(line["output"], list)
