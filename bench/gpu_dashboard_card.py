"""The dashboard's GPU cards on a real GPU: NVML sampled through `NvmlSampler` (the dashboard's own
sampler) while the GPU works, and the cards rendered headless by Textual.

    PYTHONPATH=build/dashboard-deps python3 bench/gpu_dashboard_card.py --out "$OUT"
    .venv/bin/python bench/gpu_dashboard_card.py --render-only tests/dashboard/data/gpu_h200.json --out /tmp/card

Writes to --out:
- gpu_snapshot.json: the last GpuSnapshot, as the wire type's JSON (for tests/dashboard/data/);
- gpu_dashboard_card.json: device, date, commit, how long one `sample()` took (ms), every sample;
- gpu_card.svg (+ .png when a converter is there) and gpu_card.txt: the GPU cards alone at 100
  columns; dashboard_no_daemon.svg: the whole dashboard at 160x48 with no daemon.

Load: a bf16 matmul loop on every visible GPU for the sampling window (torch, when it is there), so
the cards show real utilisation, power, clocks and our own process. Without torch the cards show
the GPUs as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.dashboard.nvml import NvmlSampler  # noqa: E402
from appliance.status import GpuSnapshot, loads, to_json  # noqa: E402


def _commit() -> str:
    env = os.environ.get("LLM_APPLIANCE_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=REPO)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _load_gpus(stop: threading.Event) -> list[threading.Thread]:
    """A matmul loop per GPU until `stop` (none without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []

    def work(device: int) -> None:
        torch.cuda.set_device(device)
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        while not stop.is_set():
            for _ in range(20):
                a @ b
            torch.cuda.synchronize(device)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(torch.cuda.device_count())]
    for t in threads:
        t.start()
    return threads


def _render(snapshot: GpuSnapshot, out: Path) -> None:
    from textual.app import App, ComposeResult
    from textual.widgets import Footer

    from appliance.dashboard.app import DashboardApp
    from appliance.dashboard.client import ControlSocketClient
    from appliance.dashboard.widgets.gpu_panel import GpuPanel

    class Fixed:
        def sample(self) -> GpuSnapshot:
            return snapshot

        def close(self) -> None:
            pass

    class CardsApp(App[None]):
        CSS = "GpuPanel { max-height: 100; }"

        def compose(self) -> ComposeResult:
            panel = GpuPanel()
            yield panel
            yield Footer()

        def on_mount(self) -> None:
            self.query_one(GpuPanel).gpus = snapshot

    async def shoot() -> None:
        rows = 6 * max(len(snapshot.gpus), 1) + 1
        cards = CardsApp()
        async with cards.run_test(size=(100, rows)) as pilot:
            await pilot.pause(0.5)
            cards.save_screenshot("gpu_card.svg", path=str(out))
            (out / "gpu_card.txt").write_text(_text(cards))
        full = DashboardApp(ControlSocketClient("/run/llm-appliance/no-daemon-here.sock"), Fixed(),
                            gpu_interval_s=3600)
        async with full.run_test(size=(160, 48)) as pilot:
            await pilot.pause(1.5)
            full.save_screenshot("dashboard_no_daemon.svg", path=str(out))

    asyncio.run(shoot())
    _to_png(out / "gpu_card.svg")


def _text(app: Any) -> str:
    import io

    from rich.console import Console

    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, color_system=None,
                      record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True))
    return console.export_text()


def _to_png(svg: Path) -> None:
    png = svg.with_suffix(".png")
    try:
        import cairosvg  # type: ignore[import-not-found]

        cairosvg.svg2png(url=str(svg), write_to=str(png))
        return
    except ImportError:
        pass
    for cmd in (["rsvg-convert", "-o", str(png), str(svg)], ["convert", str(svg), str(png)]):
        if shutil.which(cmd[0]):
            subprocess.run(cmd, check=False, timeout=120)
            if png.exists():
                return
    print("no SVG to PNG converter here: the SVG is the image", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--seconds", type=float, default=8.0, help="sampling window under load")
    parser.add_argument("--render-only", type=Path, metavar="GPU_SNAPSHOT_JSON",
                        help="no sampling: draw the cards of a recorded gpu_snapshot.json (e.g. after a "
                             "change to the card, from tests/dashboard/data/gpu_h200.json)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render_only is not None:
        _render(loads(GpuSnapshot, args.render_only.read_text()), args.out)
        print((args.out / "gpu_card.txt").read_text())
        return 0

    sampler = NvmlSampler()
    stop = threading.Event()
    load = _load_gpus(stop)
    time.sleep(2.0 if load else 0.0)  # clocks and power rise over a second or two
    samples: list[GpuSnapshot] = []
    sample_ms: list[float] = []
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        samples.append(sampler.sample())
        sample_ms.append((time.perf_counter() - t0) * 1e3)
        time.sleep(1.0)
    last = samples[-1]
    _render(last, args.out)  # while the load still runs: our process is on the cards
    stop.set()
    for t in load:
        t.join(30)
    sampler.close()

    (args.out / "gpu_snapshot.json").write_text(json.dumps(to_json(last), indent=1) + "\n")
    result = {
        "device": last.gpus[0].name if last.gpus else "none",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "driver_version": last.driver_version,
        "error": last.error,
        "num_gpus": len(last.gpus),
        "under_load": bool(load),
        "sample_ms": {"first": round(sample_ms[0], 3), "median": round(statistics.median(sample_ms), 3),
                      "max": round(max(sample_ms), 3), "count": len(sample_ms)},
        "samples": [to_json(s) for s in samples],
    }
    (args.out / "gpu_dashboard_card.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    print((args.out / "gpu_card.txt").read_text())
    return 0 if last.gpus else 1


if __name__ == "__main__":
    sys.exit(main())
