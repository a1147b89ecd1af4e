"""The agent check: what each phase and load answers, the [fleet] config keys, and the server on a
real TCP port in front of a real (still loading) Daemon. The answers of a serving, draining and
stopped box behind a real HAProxy are tests/fleet/test_fleet.py."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path

import pytest

from appliance.config import FleetConfig, load_config
from appliance.daemon import Daemon
from appliance.errors import ConfigError
from appliance.fleet.agent_check import (
    FULL_WEIGHT_BELOW_LOAD,
    MIN_WEIGHT_PERCENT,
    AgentCheckServer,
    BoxState,
    agent_reply,
    box_load,
    start_agent_check,
    weight_percent,
)
from appliance.fleet.haproxy import query_agent


def box(phase: str = "ready", ok: bool = True, kv: float = 0.0, waiting: int = 0, seqs: int = 8) -> BoxState:
    return BoxState(phase=phase, engine_ok=ok, kv_cache_usage=kv, num_waiting=waiting, max_num_seqs=seqs)


@pytest.mark.parametrize("state, reply", [
    (box("loading", ok=False), "maint"),
    (box("stopping"), "maint"),
    (box("ready", ok=False), "down #engine stalled"),
    (box("draining", ok=False), "down #engine stalled"),
    (box("draining", kv=0.9), "up drain maxconn:8"),
    (box("ready"), "up ready 100% maxconn:8"),
    (box("ready", kv=FULL_WEIGHT_BELOW_LOAD), "up ready 100% maxconn:8"),
    (box("ready", kv=1.0), f"up ready {MIN_WEIGHT_PERCENT}% maxconn:8"),
    (box("ready", waiting=8), f"up ready {MIN_WEIGHT_PERCENT}% maxconn:8"),  # a whole batch waiting
    (box("ready", kv=0.75), "up ready 60% maxconn:8"),
])
def test_reply_for_each_phase_and_load(state: BoxState, reply: str) -> None:
    assert agent_reply(state) == reply


def test_maxconn_is_shared_between_load_balancers() -> None:
    assert agent_reply(box(seqs=512), load_balancers=2) == "up ready 100% maxconn:256"
    assert agent_reply(box(seqs=1), load_balancers=4) == "up ready 100% maxconn:1"


def test_weight_falls_with_load_in_coarse_steps() -> None:
    loads = [i / 100 for i in range(101)]
    weights = [weight_percent(load) for load in loads]
    assert weights == sorted(weights, reverse=True)
    assert {w % 10 for w in weights} == {0}
    assert weights[0] == 100 and weights[-1] == MIN_WEIGHT_PERCENT
    # The load is the busier of KV usage and the waiting queue counted in batches.
    assert box_load(box(kv=0.2, waiting=6, seqs=8)) == 0.75
    assert box_load(box(kv=0.7, waiting=1, seqs=8)) == 0.7


def test_fleet_keys_are_checked_naming_file_and_key(tmp_path: Path) -> None:
    cases = {
        "[fleet]\nport = 0\n": "fleet.port: expected a port number from 1 to 65535, got 0",
        "[fleet]\nload_balancers = 0\n": "fleet.load_balancers: expected an integer >= 1, got 0",
        "[fleet]\nenabled = \"yes\"\n": "fleet.enabled: expected true or false, got 'yes'",
        "[fleet]\nenable = true\n": "fleet.enable: unknown key (did you mean 'enabled'?)",
        "[fleet]\nenabled = true\nport = 8000\n": "fleet.port: expected a port other than server.port (8000)",
    }
    for body, message in cases.items():
        path = tmp_path / "appliance.toml"
        path.write_text(body)
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        assert str(info.value).startswith(f"{path}: "), info.value
        assert message in str(info.value)
    # The same port on another address is fine; off by default.
    path.write_text("[fleet]\nenabled = true\nhost = \"127.0.0.2\"\nport = 8000\n")
    assert load_config(str(path)).fleet.port == 8000
    assert load_config(None).fleet.enabled is False


def test_shipped_config_documents_every_fleet_key_at_its_default() -> None:
    shipped = Path(__file__).resolve().parents[2] / "etc" / "appliance.toml"
    text = shipped.read_text()
    section = text[text.index("\n[fleet]\n"):]
    section = section[:section.index("\n[", 1)] if "\n[" in section[1:] else section
    for f in dataclasses.fields(FleetConfig):
        assert f"\n{f.name} = " in section or f"\n# {f.name} = " in section, f"fleet.{f.name} not documented"
    assert load_config(str(shipped)).fleet == FleetConfig()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_server_answers_on_a_real_port_and_stops() -> None:
    port = _free_port()
    config = load_config(None, {"fleet.enabled": True, "fleet.port": port, "engine.max_num_seqs": 6,
                                "control.socket_path": "/nonexistent/control.sock"})
    daemon = Daemon(config)  # the real daemon object, before it loads: phase "loading"
    agent = await start_agent_check(daemon, config)
    assert isinstance(agent, AgentCheckServer)
    try:
        assert await asyncio.to_thread(query_agent, "127.0.0.1", port) == "maint"
        daemon.state.set_phase("stopping")
        assert await asyncio.to_thread(query_agent, "127.0.0.1", port) == "maint"
    finally:
        await agent.stop()
    with pytest.raises(OSError):
        await asyncio.to_thread(query_agent, "127.0.0.1", port)


async def test_disabled_means_no_port_and_a_taken_port_is_an_error_not_a_crash(
        caplog: pytest.LogCaptureFixture) -> None:
    assert await start_agent_check(Daemon(load_config(None)), load_config(None)) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        config = load_config(None, {"fleet.enabled": True, "fleet.port": port})
        assert await start_agent_check(Daemon(config), config) is None
    assert f"no HAProxy agent check on 127.0.0.1:{port}" in caplog.text
