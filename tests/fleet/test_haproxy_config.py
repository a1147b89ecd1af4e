"""`llm-appliance fleet haproxy`: the config it writes is one HAProxy 2.6 accepts, and bad
--backend values are refused with a message naming them. (What the config does with real boxes
is tests/fleet/test_fleet.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.fleet.haproxy import BackendSpecError, HAProxyOptions, maxconn_of, parse_backend, render

REPO = Path(__file__).resolve().parents[2]
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (.ci/run installs Debian's)")


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", "fleet", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def haproxy_check(path: Path) -> subprocess.CompletedProcess[str]:
    assert HAPROXY is not None
    return subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=60)


@needs_haproxy
@pytest.mark.parametrize("balance", ["prefix", "roundrobin"])
def test_written_config_is_valid_haproxy(tmp_path: Path, balance: str) -> None:
    out = tmp_path / "haproxy.cfg"
    result = fleet("haproxy", "--backend", "10.0.0.5:8000", "--backend", "10.0.0.6:8000,maxconn=64,weight=50",
                   "--backend", "[fd00::7]:8000,name=gpu-7,agent-port=9001", "--balance", balance,
                   "--stats-socket", str(tmp_path / "admin.sock"), "--stats-bind", "127.0.0.1:8404",
                   "--max-num-seqs", "256", "-o", str(out), "--check")
    assert result.returncode == 0, result.stderr
    checked = haproxy_check(out)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = out.read_text()
    assert "server box1 10.0.0.5:8000 agent-port 8001 maxconn 256 weight 100" in text
    assert "server box2 10.0.0.6:8000 agent-port 8001 maxconn 64 weight 50" in text
    assert "server gpu-7 [fd00::7]:8000 agent-port 9001 maxconn 256 weight 100" in text
    assert "option httpchk GET /health" in text
    assert ("balance hash var(txn.prefix_key)" in text) == (balance == "prefix")
    assert ("hash-balance-factor 150" in text) == (balance == "prefix")
    # The command that wrote it is in the file, so it can be written again.
    assert "--backend 10.0.0.6:8000,maxconn=64,weight=50" in text


@needs_haproxy
def test_every_option_lands_in_a_valid_config(tmp_path: Path) -> None:
    options = HAProxyOptions(bind="127.0.0.1:9000", hash_bytes=1024, balance_factor_percent=125,
                             check_interval_s=0.5, check_fall=3, agent_interval_s=1.5, request_timeout_s=1800,
                             buffer_bytes=262144, stats_socket=None, log_target="stdout format raw", user=None,
                             chroot=None, daemon=False)
    text = render([parse_backend("127.0.0.1:8000", 0, maxconn=8)], options)
    out = tmp_path / "h.cfg"
    out.write_text(text)
    checked = haproxy_check(out)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for line in ("bind 127.0.0.1:9000", "bytes(0,1024)", "hash-balance-factor 125", "inter 500ms fall 3",
                 "agent-inter 1500ms", "timeout server 1800s", "tune.bufsize 262144"):
        assert line in text
    for absent in ("chroot", "user ", "daemon", "stats socket"):
        assert f"    {absent}" not in text


@pytest.mark.parametrize("spec, message", [
    ("10.0.0.5", "expected HOST:PORT first"),
    ("10.0.0.5:99999", "expected a port from 1 to 65535"),
    ("10.0.0.5:8000,maxcon=4", "expected KEY=VALUE with KEY one of"),
    ("10.0.0.5:8000,maxconn=0", "maxconn: expected an integer from 1"),
    ("10.0.0.5:8000,agent-port=x", "agent-port: expected an integer"),
    ("10.0.0.5:8000,name=a b", "name: expected letters"),
])
def test_bad_backend_is_refused_naming_it(spec: str, message: str) -> None:
    with pytest.raises(BackendSpecError, match=message) as info:
        parse_backend(spec, 0)
    assert repr(spec) in str(info.value)


def test_cli_refuses_duplicate_names_and_bad_numbers_with_status_2() -> None:
    result = fleet("haproxy", "--backend", "a:1,name=x", "--backend", "b:2,name=x")
    assert result.returncode == 2 and "the name 'x' is used twice" in result.stderr
    result = fleet("haproxy", "--backend", "a:1", "--balance-factor", "90")
    assert result.returncode == 2 and "--balance-factor: expected an integer >= 101" in result.stderr
    result = fleet("haproxy", "--backend", "nohostport")
    assert result.returncode == 2 and "'nohostport'" in result.stderr


def test_query_of_a_box_that_does_not_answer_fails_naming_it() -> None:
    # Port 1 on loopback: nothing listens there.
    result = fleet("haproxy", "--backend", "127.0.0.1:8000,agent-port=1", "--query")
    assert result.returncode == 1
    assert "no agent check at 127.0.0.1:1 (box1)" in result.stderr


def test_maxconn_is_read_from_an_agent_reply() -> None:
    assert maxconn_of("up ready 80% maxconn:12") == 12
    assert maxconn_of("up,drain,maxconn:3") == 3
    assert maxconn_of("maint") is None
