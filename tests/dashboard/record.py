"""Re-record the snapshots the dashboard's snapshot tests replay (tests/dashboard/data/*.json):
a real daemon (default model, CPU) idle, then busy under real chat requests; every `stats` and
`requests` event of its /events stream, as the daemon sent it.

    .venv/bin/python tests/dashboard/record.py
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import CONFIG, Load, start_daemon  # noqa: E402

from appliance.dashboard.client import ControlSocketClient  # noqa: E402
from appliance.status import RequestList, to_json  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


async def record(socket_path: str, seconds: float) -> list[dict[str, object]]:
    client = ControlSocketClient(socket_path)
    events: list[dict[str, object]] = []
    deadline = time.monotonic() + seconds
    try:
        async for event in client.events():
            name = "requests" if isinstance(event, RequestList) else "stats"
            events.append({"event": name, "data": to_json(event)})
            if time.monotonic() > deadline and name == "requests":
                break
    finally:
        await client.close()
    return events


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="llma-", dir="/tmp"))
    daemon = start_daemon(workdir, config_text=CONFIG)
    try:
        time.sleep(2)
        idle = asyncio.run(record(daemon.control_socket, 3))
        with Load(daemon) as load:
            time.sleep(5)  # let the first requests reach decode
            busy = asyncio.run(record(daemon.control_socket, 40))
        # The snapshots should show every panel at work, 429s included.
        assert 429 in load.statuses and 200 in load.statuses, load.statuses
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    DATA.mkdir(exist_ok=True)
    for name, events in (("idle", idle), ("busy", busy)):
        (DATA / f"{name}.json").write_text(json.dumps(events, indent=1) + "\n")
        print(f"{name}: {len(events)} events")


if __name__ == "__main__":
    main()
