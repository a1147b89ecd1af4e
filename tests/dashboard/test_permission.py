"""A user outside the control socket's group is told which group to join, by `ctl` and by the
dashboard's banner. Real EACCES: the socket (mode 0660, group root) is opened as `nobody`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETPRIV = shutil.which("setpriv")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None,
                                reason="needs root and setpriv to open a socket as another user")


@pytest.fixture
def root_only_socket() -> Iterator[str]:
    directory = Path(tempfile.mkdtemp(prefix="llmp-", dir="/tmp"))
    directory.chmod(0o755)
    path = str(directory / "control.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    os.chmod(path, 0o660)  # root:root, as a daemon's socket is root:llm-appliance
    yield path
    listener.close()
    shutil.rmtree(directory, ignore_errors=True)


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    assert SETPRIV is not None
    return subprocess.run([SETPRIV, "--reuid=nobody", "--regid=nogroup", "--clear-groups", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "HOME": "/tmp", "PYTHONPATH": str(REPO)})


def test_ctl_names_the_group(root_only_socket: str) -> None:
    out = as_nobody(sys.executable, "-m", "appliance.cli", "ctl", "--socket", root_only_socket, "status")
    assert out.returncode == 69, out.stderr
    assert f"permission denied on {root_only_socket}: join its group (root)" in out.stderr
    assert "sudo usermod -aG root $USER" in out.stderr


def test_dashboard_banner_names_the_group(root_only_socket: str) -> None:
    script = f"""
import asyncio
from appliance.dashboard.app import DashboardApp
from appliance.dashboard.client import ControlSocketClient
from appliance.dashboard.nvml import NvmlSampler
from appliance.dashboard.widgets.banner import Banner

async def main():
    app = DashboardApp(ControlSocketClient({root_only_socket!r}), NvmlSampler())
    async with app.run_test(size=(120, 30)) as pilot:
        while app.connection.attempt == 0:
            await pilot.pause(0.05)
        print(app.query_one(Banner).render())

asyncio.run(main())
"""
    out = as_nobody(sys.executable, "-c", script)
    assert out.returncode == 0, out.stderr
    assert f"DAEMON UNREACHABLE: permission denied on {root_only_socket}: join its group (root)" in out.stdout
