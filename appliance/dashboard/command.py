"""`llm-appliance dashboard` (alias `llm-appliance top`): the Textual dashboard over the control
socket. Textual is imported only when it runs, so `--help` is instant."""

from __future__ import annotations

import argparse

from appliance.ctl import DEFAULT_SOCKET


def add_arguments_dashboard(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", default=DEFAULT_SOCKET, metavar="PATH",
                        help=f"the daemon's control socket (default {DEFAULT_SOCKET}; "
                             "env LLM_APPLIANCE_CONTROL_SOCKET)")
    parser.add_argument("--no-gpu", action="store_true", help="do not sample NVML (GPU cards say so)")


def run_dashboard(args: argparse.Namespace) -> int:
    from appliance.dashboard.app import DashboardApp
    from appliance.dashboard.client import ControlSocketClient
    from appliance.dashboard.nvml import NvmlSampler
    from appliance.status import GpuSnapshot

    class _NoGpu:
        def sample(self) -> GpuSnapshot:
            return GpuSnapshot(error="GPU sampling off (--no-gpu)")

        def close(self) -> None:
            pass

    app = DashboardApp(ControlSocketClient(args.socket), _NoGpu() if args.no_gpu else NvmlSampler())
    app.run()
    return app.return_code or 0


add_arguments_top = add_arguments_dashboard
run_top = run_dashboard
