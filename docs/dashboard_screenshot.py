"""Remake docs/dashboard.txt and docs/dashboard.svg: the dashboard against a busy daemon.

A real daemon (default model, CPU) under real streamed chat requests (tests/dashboard/harness.py:
two clients, one of them over its concurrency quota, so 429s show), then:
- `llm-appliance dashboard` in a detached tmux session, captured with `tmux capture-pane` as text
  (docs/dashboard.txt): what an operator sees over SSH;
- the same app headless (Textual's `save_screenshot`) as SVG (docs/dashboard.svg).

    .venv/bin/python docs/dashboard_screenshot.py [--width 120 --height 36 --seconds 90]
    .venv/bin/python docs/dashboard_screenshot.py --width 80 --height 24 --name dashboard-80x24
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "dashboard"))

from harness import CONFIG, Load, start_daemon  # noqa: E402

from appliance.dashboard.app import DashboardApp  # noqa: E402
from appliance.dashboard.client import ControlSocketClient  # noqa: E402
from appliance.dashboard.nvml import NvmlSampler  # noqa: E402


def tmux_start(socket_path: str, width: int, height: int) -> str:
    session = f"llma-dash-{int(time.time())}"
    cmd = f"{shlex.quote(sys.executable)} -m appliance.cli dashboard --socket {shlex.quote(socket_path)}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", str(width), "-y", str(height),
                    "-c", str(REPO), cmd], check=True)
    return session


def tmux_capture(session: str) -> str:
    try:
        out = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], check=True, capture_output=True,
                             text=True)
        return out.stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


async def svg(socket_path: str, width: int, height: int, settle_s: float, out: Path) -> None:
    app = DashboardApp(ControlSocketClient(socket_path), NvmlSampler())
    async with app.run_test(size=(width, height)) as pilot:
        await pilot.pause(settle_s)
        app.save_screenshot(out.name, path=str(out.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=120)
    parser.add_argument("--height", type=int, default=36)
    parser.add_argument("--seconds", type=float, default=90.0, help="load before the captures")
    parser.add_argument("--name", default="dashboard", help="docs/NAME.txt and docs/NAME.svg")
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        print("tmux is not installed", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="llma-", dir="/tmp"))
    daemon = start_daemon(workdir, config_text=CONFIG)
    try:
        with Load(daemon):
            # Both dashboards watch the whole busy minute, so their sparklines have a history.
            session = tmux_start(daemon.control_socket, args.width, args.height)
            asyncio.run(svg(daemon.control_socket, args.width, args.height, args.seconds,
                            REPO / "docs" / f"{args.name}.svg"))
            text = tmux_capture(session)
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    (REPO / "docs" / f"{args.name}.txt").write_text(text.rstrip("\n") + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
