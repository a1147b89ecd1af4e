"""`llm-appliance` command line: one parser, each subcommand implemented in its owner module.

Subcommand modules are imported lazily so `llm-appliance ctl` and `dashboard` start without torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from appliance import __version__

# subcommand -> "module:function". The function takes the parsed args and returns an exit status.
# Each module also has `add_arguments_<name>(parser)` next to it (see _SUBCOMMANDS below).
_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("appliance.daemon", "Run the daemon: engine + OpenAI HTTP API + control socket."),
    "config": ("appliance.daemon", "Check a config file or show the effective config."),
    "ctl": ("appliance.ctl", "Talk to a running daemon over its control socket."),
    "dashboard": ("appliance.dashboard.command", "The operator's dashboard: engine, requests, clients, GPUs."),
    "top": ("appliance.dashboard.command", "Alias of `dashboard`."),
    "generate": ("appliance.engine.generate_cli", "Generate text offline from a prompt or chat message."),
    "model": ("appliance.models.fetch", "Manage models: `model fetch` gets the embedded default."),
    "fleet": ("appliance.fleet.cli", "Several boxes behind HAProxy: `fleet haproxy` writes its config."),
    "bench": ("appliance_bench.offline",
              "Benchmarks: `bench offline` runs workload W1; `bench serve` loads an OpenAI-compatible server."),
}
# `bench SUITE`: each suite in its own module (`bench serve` only talks HTTP and never loads torch).
_BENCH_SUITES: dict[str, str] = {"offline": "appliance_bench.offline", "serve": "appliance.benchserve.command"}


def _load(module: str) -> object:
    return importlib.import_module(module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-appliance", description="Self-hosted LLM serving appliance.")
    parser.add_argument("--version", action="version", version=f"llm-appliance {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _name=name)
        # Only the chosen subcommand's module is imported (below); others stay unloaded.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # NOTE: before torch loads OpenMP. Spinning OpenMP workers made CPU decode 5-14x slower
    # whenever anything else ran on the box (measured: 1.6 vs 8.2 tok/s on the 135M default).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    # First pass: find the subcommand, then let its module add its own arguments.
    if not argv or argv[0] not in _SUBCOMMANDS:
        parser.parse_args(argv)  # prints help / version / an error
        parser.print_help()
        return 2
    name = argv[0]
    module_name = _SUBCOMMANDS[name][0]
    if name == "bench" and len(argv) > 1 and argv[1] in _BENCH_SUITES:
        module_name = _BENCH_SUITES[argv[1]]
    module = _load(module_name)
    sub_parser = argparse.ArgumentParser(prog=f"llm-appliance {name}", description=_SUBCOMMANDS[name][1])
    add_arguments: Callable[[argparse.ArgumentParser], None] = getattr(module, f"add_arguments_{name}")
    add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    run: Callable[[argparse.Namespace], int] = getattr(module, f"run_{name}")
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
