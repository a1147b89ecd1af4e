"""`llm-appliance ctl`: talk to a running daemon over its control socket.

Standard library only (http.client over AF_UNIX): it starts in a blink and never imports torch,
so an operator can run it while the GPU box is busy. `ControlClient` is reusable (the dashboard).

Exit status: 0 done, 1 the daemon refused (its message is printed), 69 (EX_UNAVAILABLE) no daemon
at the socket.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
from typing import Any
from urllib.parse import quote

from appliance.config import LOG_LEVELS, ControlConfig
from appliance.dashboard.format import duration, seconds, socket_error
from appliance.status import (
    CancelResult,
    ErrorBody,
    LogLevelResult,
    PhaseResult,
    ReloadResult,
    RequestList,
    RequestRow,
    StatusSnapshot,
    WireError,
    from_json,
    to_json,
)

EX_UNAVAILABLE = 69
DEFAULT_SOCKET = os.environ.get("LLM_APPLIANCE_CONTROL_SOCKET", ControlConfig.socket_path)


class ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    """Blocking client of the control socket; answers are the wire types of appliance/status.py.
    Raises OSError when nothing listens there, ControlError when the daemon answers with an error,
    and WireError when its answer does not fit the type (a daemon of another version)."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout_s: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One call; the parsed JSON answer."""
        conn = _UnixHTTPConnection(self.socket_path, self.timeout_s)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            data = json.loads(raw or b"null")
        except json.JSONDecodeError:
            data = None
        if response.status >= 400:
            raise ControlError(response.status, error_message(response.status, data))
        return data

    def status(self) -> StatusSnapshot:
        return from_json(StatusSnapshot, self.request("GET", "/status"))

    def requests(self) -> list[RequestRow]:
        return from_json(RequestList, self.request("GET", "/requests")).requests

    def cancel(self, request_id: str) -> CancelResult:
        return from_json(CancelResult, self.request("POST", f"/requests/{quote(request_id, safe='')}/cancel"))

    def drain(self) -> PhaseResult:
        return from_json(PhaseResult, self.request("POST", "/drain"))

    def resume(self) -> PhaseResult:
        return from_json(PhaseResult, self.request("POST", "/resume"))

    def reload(self) -> ReloadResult:
        return from_json(ReloadResult, self.request("POST", "/reload"))

    def set_log_level(self, level: str) -> LogLevelResult:
        return from_json(LogLevelResult, self.request("PUT", "/log-level", {"level": level}))


def error_message(status: int, data: Any) -> str:
    """The daemon's message from an error body, or the bare HTTP status."""
    try:
        return from_json(ErrorBody, data["error"]).message
    except (WireError, TypeError, KeyError):
        return f"HTTP {status}"


# ----- command line ---------------------------------------------------------------------------


def add_arguments_ctl(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", default=DEFAULT_SOCKET, metavar="PATH",
                        help=f"control socket (default {DEFAULT_SOCKET}; env LLM_APPLIANCE_CONTROL_SOCKET)")
    parser.add_argument("--json", action="store_true", help="print the daemon's JSON answer as is")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("status", help="version, model, phase, uptime, engine figures")
    sub.add_parser("requests", help="requests in flight (no text)")
    cancel = sub.add_parser("cancel", help="abort one request in flight")
    cancel.add_argument("request_id", metavar="ID")
    sub.add_parser("drain", help="stop admitting new requests (503); in-flight ones finish")
    sub.add_parser("resume", help="admit requests again after a drain")
    sub.add_parser("reload", help="re-read the config: client keys, quotas, log level")
    level = sub.add_parser("log-level", help="set the daemon's log level (not persisted)")
    level.add_argument("level", type=str.upper, choices=LOG_LEVELS)


def _format_status(s: StatusSnapshot) -> str:
    lines = [
        f"llm-appliance {s.version} (pid {s.pid})",
        f"  phase       {s.phase}",
        f"  model       {s.model or '-'}",
        f"  http        {s.http_address or '-'}",
        f"  config      {s.config_path or '(built-in defaults)'}",
        f"  uptime      {duration(s.uptime_s)}",
        f"  log level   {s.log_level}",
        f"  in flight   {s.inflight}",
    ]
    e = s.engine
    if e:
        t, lat, q = s.throughput, s.latency, s.queue
        lines += [
            f"  engine      {'progressing' if e.progressing else 'STALLED'}"
            f"{' DEAD' if e.dead else ''}, {e.num_running} running, {e.num_waiting} waiting",
            f"  kv cache    {e.kv_cache_usage:.1%} used ({e.num_kv_blocks_used}/{e.num_kv_blocks_total}"
            f" blocks, {e.num_kv_blocks_cached} cached)",
            f"  prefix hits {e.prefix_cache_hit_rate:.1%} ({e.prefix_cache_hits}/{e.prefix_cache_queries} tokens)",
            f"  throughput  {t.generation_tokens_per_s:.1f} tokens/s generated, {t.prompt_tokens_per_s:.1f}"
            f" prompt tokens/s, {t.requests_per_s:.2f} requests/s"
            f" ({e.generation_tokens_total} generated, {e.num_preemptions} preemptions)",
            f"  latency     TTFT p50 {seconds(lat.ttft_p50_s)} p99 {seconds(lat.ttft_p99_s)},"
            f" inter-token p50 {seconds(lat.inter_token_p50_s)} p99 {seconds(lat.inter_token_p99_s)}"
            f" (last {duration(lat.window_s)})",
            f"  queue       {q.admission_queued} awaiting a first token, {q.rejected_total} rejected (429)"
            f", {q.rejected_last_minute} in the last minute",
            f"  steps       {e.num_steps}: " + (", ".join(f"{n} {p.replace('_', ' ')}" for p, n in e.steps_by_path.items())
                                               or "none launched"),
            f"  stalls      {e.kernel_compiles} kernel compiles while serving, garbage-collector pauses"
            f" >= 50 ms: {e.gc_long_pauses} engine, {s.daemon_gc_long_pauses} daemon",
        ]
    for c in s.clients:
        lines.append(f"  client      {c.name}: {c.requests_total} requests ({c.rejected_total} rejected),"
                     f" {c.in_flight} in flight, last minute {c.requests_last_minute} requests"
                     f"{_limit(c.requests_per_minute_limit)} {c.tokens_last_minute} tokens"
                     f"{_limit(c.tokens_per_minute_limit)}")
    return "\n".join(lines)


def _limit(limit: int) -> str:
    return f"/{limit}" if limit else ""


def _format_requests(rows: list[RequestRow]) -> str:
    if not rows:
        return "no requests in flight"
    header = f"{'ID':<40} {'CLIENT':<16} {'PHASE':<10} {'PROMPT':>7} {'OUTPUT':>7} {'AGE':>8} {'TOK/S':>7}"
    lines = [header]
    for r in rows:
        lines.append(f"{r.id:<40} {r.client:<16} {r.phase:<10} {r.prompt_tokens:>7}"
                     f" {r.completion_tokens:>7} {r.age_s:>7.1f}s {r.tokens_per_s:>7.1f}")
    return "\n".join(lines)


def _format(action: str, data: Any) -> str:
    if action == "status":
        return _format_status(data)
    if action == "requests":
        return _format_requests(data)
    if action == "cancel":
        return f"cancelled {data.request_id}"
    if action in ("drain", "resume"):
        extra = f", {data.inflight} request(s) in flight" if data.inflight is not None else ""
        return f"phase {data.phase}{extra}"
    if action == "reload":
        text = f"reloaded: {len(data.clients)} client(s) ({', '.join(data.clients) or 'API open'})"
        if data.needs_restart:
            text += "\nneeds a restart to apply: " + ", ".join(data.needs_restart)
        return text
    if action == "log-level":
        return f"log level {data.level}"
    raise AssertionError(action)


def run_ctl(args: argparse.Namespace) -> int:
    client = ControlClient(args.socket)
    calls = {
        "status": client.status,
        "requests": client.requests,
        "cancel": lambda: client.cancel(args.request_id),
        "drain": client.drain,
        "resume": client.resume,
        "reload": client.reload,
        "log-level": lambda: client.set_log_level(args.level),
    }
    try:
        data = calls[args.action]()
    except ControlError as e:
        print(f"llm-appliance ctl {args.action}: {e}", file=sys.stderr)
        return 1
    except WireError as e:
        print(f"llm-appliance ctl {args.action}: unexpected answer (a daemon of another version?): {e}",
              file=sys.stderr)
        return 1
    except OSError as e:
        print(f"llm-appliance ctl: {socket_error(args.socket, e)}", file=sys.stderr)
        return EX_UNAVAILABLE
    print(json.dumps(to_json(data), indent=2) if args.json else _format(args.action, data))
    return 0
