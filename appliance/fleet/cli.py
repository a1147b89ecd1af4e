"""`llm-appliance fleet`: several appliances behind HAProxy (docs/fleet.md).

    llm-appliance fleet haproxy --backend 10.0.0.5:8000 --backend 10.0.0.6:8000 -o haproxy.cfg
    llm-appliance fleet agent 10.0.0.5            # what that box's agent check answers now

Exit status: 0 done, 1 a box did not answer `--query` or `--check` found the file wrong,
2 a bad argument.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from appliance.config import FleetConfig, SchedulerConfig
from appliance.fleet.haproxy import (
    BALANCE_ALGORITHMS,
    DEFAULT_BALANCE_FACTOR_PERCENT,
    DEFAULT_HASH_BYTES,
    BackendSpecError,
    HAProxyOptions,
    maxconn_of,
    parse_backend,
    query_agent,
    render,
)

_DEFAULTS = HAProxyOptions()


def add_arguments_fleet(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    h = sub.add_parser("haproxy", help="write an HAProxy 2.6 config for several boxes",
                       description="Write a complete, commented HAProxy 2.6 configuration for several "
                                   "appliances: prefix affinity, health and agent checks, retries.")
    h.add_argument("--backend", action="append", required=True, metavar="HOST:PORT[,KEY=VALUE...]",
                   help="one box's HTTP API; repeat per box. Keys: name=, agent-port=, maxconn=, weight=")
    h.add_argument("-o", "--output", metavar="FILE", help="write here (default: standard output)")
    h.add_argument("--bind", default=_DEFAULTS.bind, help="where clients connect (default %(default)s)")
    h.add_argument("--agent-port", type=int, default=FleetConfig.port,
                   help="the boxes' [fleet] port (default %(default)s)")
    h.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs,
                   help="the boxes' engine.max_num_seqs: each box's maxconn (default %(default)s)")
    h.add_argument("--query", action="store_true",
                   help="ask each box's agent check for its maxconn instead of --max-num-seqs")
    h.add_argument("--balance", choices=BALANCE_ALGORITHMS, default="prefix",
                   help="prefix: hash the prompt's start (default); roundrobin: no affinity")
    h.add_argument("--hash-bytes", type=int, default=DEFAULT_HASH_BYTES,
                   help="bytes of the prompt's start that choose the box (default %(default)s)")
    h.add_argument("--balance-factor", type=int, default=DEFAULT_BALANCE_FACTOR_PERCENT, metavar="PERCENT",
                   help="no box above this %% of the average load (hash-balance-factor, default %(default)s)")
    h.add_argument("--check-interval", type=float, default=_DEFAULTS.check_interval_s, metavar="SECONDS",
                   help="health check interval (default %(default)s)")
    h.add_argument("--agent-interval", type=float, default=_DEFAULTS.agent_interval_s, metavar="SECONDS",
                   help="agent check interval (default %(default)s)")
    h.add_argument("--request-timeout", type=float, default=_DEFAULTS.request_timeout_s, metavar="SECONDS",
                   help="longest silence of a client or a box (default %(default)s)")
    h.add_argument("--buffer-bytes", type=int, default=_DEFAULTS.buffer_bytes,
                   help="tune.bufsize: the largest request that can be retried (default %(default)s)")
    h.add_argument("--stats-socket", default=_DEFAULTS.stats_socket, metavar="PATH",
                   help="HAProxy's admin socket (default %(default)s; '' for none)")
    h.add_argument("--stats-bind", metavar="ADDR:PORT", help="serve HAProxy's stats page here")
    h.add_argument("--log", default=_DEFAULTS.log_target, metavar="TARGET",
                   help="HAProxy's log target (default %(default)s; 'stdout format raw' in a container)")
    h.add_argument("--user", default=_DEFAULTS.user, help="run HAProxy as this user and group ('' to keep)")
    h.add_argument("--chroot", default=_DEFAULTS.chroot, metavar="DIR", help="chroot of HAProxy ('' for none)")
    h.add_argument("--foreground", action="store_true", help="leave out `daemon` (run under a supervisor)")
    h.add_argument("--check", action="store_true", help="run `haproxy -c -f` on the result")
    a = sub.add_parser("agent", help="print what a box's agent check answers now")
    a.add_argument("box", metavar="HOST[:AGENT_PORT]")


def run_fleet(args: argparse.Namespace) -> int:
    if args.action == "agent":
        return _run_agent(args)
    return _run_haproxy(args)


def _run_agent(args: argparse.Namespace) -> int:
    host, sep, port = args.box.rpartition(":")
    if not sep or not port.isdigit():
        host, port = args.box, str(FleetConfig.port)
    try:
        print(query_agent(host.strip("[]"), int(port)))
    except OSError as e:
        print(f"llm-appliance: no agent check at {host}:{port}: {e}", file=sys.stderr)
        return 1
    return 0


def _run_haproxy(args: argparse.Namespace) -> int:
    for name, low in (("hash_bytes", 1), ("balance_factor", 101), ("buffer_bytes", 16384)):
        if getattr(args, name) < low:
            return _usage(f"--{name.replace('_', '-')}: expected an integer >= {low}, got {getattr(args, name)}")
    for name in ("check_interval", "agent_interval", "request_timeout"):
        if getattr(args, name) <= 0:
            return _usage(f"--{name.replace('_', '-')}: expected seconds > 0, got {getattr(args, name)}")
    try:
        backends = [parse_backend(spec, i, agent_port=args.agent_port, maxconn=None)
                    for i, spec in enumerate(args.backend)]
    except BackendSpecError as e:
        return _usage(str(e))
    resolved = []
    for backend in backends:
        maxconn = backend.maxconn
        if maxconn is None and args.query:
            try:
                reply = query_agent(backend.host, backend.agent_port)
            except OSError as e:
                print(f"llm-appliance: --query: no agent check at {backend.host}:{backend.agent_port} "
                      f"({backend.name}): {e}", file=sys.stderr)
                return 1
            maxconn = maxconn_of(reply)
            if maxconn is None:
                print(f"llm-appliance: --query: {backend.name} answered {reply!r}, which has no maxconn "
                      f"(a box loading or stopping answers 'maint'; try again when it serves)", file=sys.stderr)
                return 1
        resolved.append(dataclasses.replace(backend, maxconn=maxconn or args.max_num_seqs))
    options = HAProxyOptions(
        bind=args.bind, balance=args.balance, hash_bytes=args.hash_bytes,
        balance_factor_percent=args.balance_factor, check_interval_s=args.check_interval,
        agent_interval_s=args.agent_interval, request_timeout_s=args.request_timeout,
        buffer_bytes=args.buffer_bytes, stats_socket=args.stats_socket or None, stats_bind=args.stats_bind,
        log_target=args.log, user=args.user or None, chroot=args.chroot or None, daemon=not args.foreground)
    try:
        text = render(resolved, options, command_line=_command_line(args))
    except BackendSpecError as e:
        return _usage(str(e))
    if args.check and not _haproxy_check(text):
        return 1
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The command that writes this file again (every option spelled out, --query resolved)."""
    words = ["llm-appliance", "fleet", "haproxy"]
    for spec in args.backend:
        words += ["--backend", spec]
    for flag in ("bind", "agent_port", "max_num_seqs", "balance", "hash_bytes", "balance_factor",
                 "check_interval", "agent_interval", "request_timeout", "buffer_bytes", "stats_socket",
                 "stats_bind", "log", "user", "chroot"):
        value = getattr(args, flag)
        if value is not None:
            words += [f"--{flag.replace('_', '-')}", str(value)]
    if args.query:
        words.append("--query")
    if args.foreground:
        words.append("--foreground")
    return shlex.join(words)


def _haproxy_check(text: str) -> bool:
    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if haproxy is None:
        print("llm-appliance: --check: haproxy is not installed (apt install haproxy)", file=sys.stderr)
        return False
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as f:
        f.write(text)
        f.flush()
        result = subprocess.run([haproxy, "-c", "-f", f.name], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"llm-appliance: haproxy -c found errors:\n{result.stdout}{result.stderr}", file=sys.stderr)
        return False
    return True


def _usage(message: str) -> int:
    print(f"llm-appliance fleet: {message}", file=sys.stderr)
    return 2
