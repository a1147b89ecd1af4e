"""The wire types of appliance/status.py: what the daemon sent (recorded) decodes to the same
objects, versions may add or drop optional fields, and a wrong field is named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from recorded import DATA

from appliance.status import (
    RequestList,
    StatusSnapshot,
    WireError,
    format_event,
    from_json,
    parse_event,
    to_json,
)


def _raw_events(name: str) -> list[dict]:
    return json.loads((DATA / f"{name}.json").read_text())


def test_recorded_events_round_trip() -> None:
    for event in _raw_events("busy"):
        obj = parse_event(event["event"], json.dumps(event["data"]))
        assert to_json(obj) == event["data"]
        name, data = format_event(event["event"], obj).decode().split("\n")[:2]
        assert name == f"event: {event['event']}" and json.loads(data.removeprefix("data: ")) == event["data"]


def test_unknown_keys_are_ignored_and_missing_optional_ones_defaulted() -> None:
    data = next(e["data"] for e in _raw_events("busy") if e["event"] == "stats")
    newer = {**data, "something_new": {"x": 1}}
    older = {k: v for k, v in data.items() if k not in ("latency", "clients", "config_path")}
    assert from_json(StatusSnapshot, newer) == from_json(StatusSnapshot, data)
    old = from_json(StatusSnapshot, older)
    assert old.clients == [] and old.latency.ttft_p50_s is None and old.config_path is None


@pytest.mark.parametrize("path, value, message", [
    (("phase",), None, "StatusSnapshot.phase: expected str, got None"),
    (("engine", "num_running"), "3", "StatusSnapshot.engine.num_running: expected int, got '3'"),
    (("clients", 0, "in_flight"), True, "StatusSnapshot.clients[0].in_flight: expected int, got True"),
    (("throughput",), [], "StatusSnapshot.throughput: expected an object, got list"),
    (("engine", "steps_by_path"), [], "StatusSnapshot.engine.steps_by_path: expected an object, got list"),
    (("engine", "steps_by_path", "eager"), 1.5, "StatusSnapshot.engine.steps_by_path.eager: expected int, got 1.5"),
])
def test_a_wrong_field_is_named(path: tuple, value: object, message: str) -> None:
    data = json.loads(json.dumps(next(e["data"] for e in _raw_events("busy") if e["event"] == "stats")))
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(WireError) as info:
        from_json(StatusSnapshot, data)
    assert str(info.value) == message


def test_a_missing_required_field_is_named() -> None:
    with pytest.raises(WireError, match=r"RequestList.requests\[0\].client: missing"):
        from_json(RequestList, {"requests": [{"id": "x"}]})
    with pytest.raises(WireError, match="unknown event 'gpu'"):
        parse_event("gpu", "{}")


def test_import_contract_holds() -> None:
    """pyproject's import-linter contract: dashboard, ctl and status never import the engine,
    the server, the models, torch or transformers (not even indirectly)."""
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout or "0 broken" in out.stdout
