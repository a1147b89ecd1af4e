"""Static checks of what the .deb installs: the systemd unit and the logrotate rules."""

from __future__ import annotations

import getpass
import grp
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.config import EX_CONFIG, ServerConfig

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "llm-appliance.service"
LOGROTATE = REPO / "logrotate" / "llm-appliance"
INSTALLED_BINARY = "/opt/llm-appliance/bin/llm-appliance"


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_has_what_the_appliance_relies_on() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["User"] == ["llm-appliance"] and d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == [str(EX_CONFIG)]
    assert float(d["TimeoutStopSec"][0]) > ServerConfig.drain_timeout_s
    assert int(d["WatchdogSec"][0]) > 0
    for key in ("RuntimeDirectory", "StateDirectory", "CacheDirectory", "LogsDirectory"):
        assert d[key] == ["llm-appliance"]
    env = dict(e.split("=", 1) for e in d["Environment"])
    assert env["LLM_APPLIANCE_CACHE"] == "/var/cache/llm-appliance"  # models in its models/
    for var in ("HF_HOME", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"):
        assert env[var].startswith("/var/cache/llm-appliance/")
    # CUDA needs the device nodes and JIT (W+X) memory.
    assert "PrivateDevices" not in d and "MemoryDenyWriteExecute" not in d and "DeviceAllow" not in d
    assert d["ExecStart"][0].startswith(f"{INSTALLED_BINARY} serve --config /etc/llm-appliance/appliance.toml")


def _unit_with_stub_binary(tmp_path: Path) -> Path:
    # The only host-specific part of the unit is the installed binary: point it at a stub.
    stub = tmp_path / "llm-appliance"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = tmp_path / "llm-appliance.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(stub)))
    return unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_prints_nothing(tmp_path: Path) -> None:
    unit = _unit_with_stub_binary(tmp_path)
    # NOTE: verify exits 0 even on "Unknown key ... ignoring": any output is a failure.
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_security_exposure_stays_low(tmp_path: Path) -> None:
    unit = _unit_with_stub_binary(tmp_path)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze has no offline security check: {result.stderr.strip()}")
    # 1.8 now: what is left is CUDA's devices, W+X memory, /proc and the network (see the unit).
    assert float(match.group(1)) <= 2.0, result.stdout


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate not installed")
def test_logrotate_debug_run_is_clean(tmp_path: Path) -> None:
    logs = tmp_path / "log"
    logs.mkdir(mode=0o750)
    (logs / "requests.log").write_text('{"request_id": "x"}\n')
    user = getpass.getuser()
    group = grp.getgrgid(os.getgid()).gr_name
    # The service user does not exist on a build host: run the same rules as whoever runs this.
    rules = (LOGROTATE.read_text().replace("/var/log/llm-appliance", str(logs))
             .replace("llm-appliance llm-appliance", f"{user} {group}"))
    assert f"{logs}/*.log {{" in rules and f"su {user} {group}" in rules
    conf = tmp_path / "llm-appliance"
    conf.write_text(rules)
    result = subprocess.run(["logrotate", "-d", "--state", str(tmp_path / "state"), str(conf)],
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not re.search(r"^error", output, re.MULTILINE), output
    assert "considering log" in output and "requests.log" in output
