"""The HAProxy configuration for several appliances: `render(backends, options) -> str`.

Written for HAProxy 2.6 (Debian bookworm's `haproxy`); `haproxy -c -f FILE` checks it. What it
sets up, each part commented in the file itself:

- affinity: `balance hash` on the first bytes of the prompt's leading part (the first chat
  message, else the completion prompt, else the body), read from the buffered body with
  `json_query`, on a consistent-hash ring with a bounded-load factor (`hash-balance-factor`), so a
  shared system prompt stays on the box whose prefix cache holds it until that box has more than
  its share of the requests;
- health: `option httpchk GET /health` (a stalled or dead engine fails it) and the appliance's
  agent check ([fleet] port: ready / drain / maint, a weight from the load, maxconn);
- failures: requests that got no response (connection refused, the box died before answering,
  503 from a draining box) are retried on another box; a response already streaming is not;
- timeouts long enough for a stream or a long non-streamed generation;
- the client's Authorization header passes through: every box checks keys itself.

NOTE: standard library only; this runs on the load balancer's host, which has no torch.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from appliance import __version__
from appliance.config import FleetConfig

# The key is cut to this many bytes. A prefix-cache block is 16 tokens (about 64 bytes of English);
# 256 bytes are a few blocks: enough to tell system prompts apart, short enough that prompts
# sharing a long start (a template with a variable tail) still meet on one box.
DEFAULT_HASH_BYTES = 256
DEFAULT_BALANCE_FACTOR_PERCENT = 150  # no box above 1.5x the average concurrent requests
BALANCE_ALGORITHMS = ("prefix", "roundrobin")


@dataclass(frozen=True)
class Backend:
    """One appliance as HAProxy sees it."""

    name: str
    host: str
    port: int  # the box's HTTP API (server.port)
    agent_port: int  # the box's [fleet] port
    maxconn: int | None  # concurrent requests HAProxy sends it (the agent updates it live); None: not given
    weight: int = 100

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class HAProxyOptions:
    bind: str = ":8000"  # where clients connect
    balance: str = "prefix"  # "prefix" (affinity) or "roundrobin" (for comparison)
    hash_bytes: int = DEFAULT_HASH_BYTES
    balance_factor_percent: int = DEFAULT_BALANCE_FACTOR_PERCENT
    check_interval_s: float = 2.0
    check_fall: int = 2
    check_rise: int = 2
    agent_interval_s: float = 2.0
    request_timeout_s: float = 600.0  # the longest silence of a box: a whole non-streamed generation
    retries: int = 3
    buffer_bytes: int = 65536
    max_connections: int = 4096
    stats_socket: str | None = "/run/haproxy/admin.sock"
    stats_bind: str | None = None  # e.g. "127.0.0.1:8404" for the stats page
    log_target: str = "/dev/log"
    user: str | None = "haproxy"
    chroot: str | None = "/var/lib/haproxy"
    daemon: bool = True


class BackendSpecError(ValueError):
    """A --backend value that cannot be read; the message names it."""


_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$")
_SPEC_KEYS = ("name", "agent-port", "maxconn", "weight")


def parse_backend(spec: str, index: int, *, agent_port: int = FleetConfig.port,
                  maxconn: int | None = None) -> Backend:
    """`HOST:PORT[,name=N][,agent-port=P][,maxconn=M][,weight=W]` (IPv6 as [ADDR]:PORT).
    `index` names unnamed boxes box1, box2, ...; `maxconn` is used when the spec has none."""
    address, *options = [part.strip() for part in spec.split(",")]
    match = _HOST_PORT.match(address)
    if not match:
        raise BackendSpecError(f"--backend {spec!r}: expected HOST:PORT first, e.g. 10.0.0.5:8000")
    values: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in _SPEC_KEYS:
            raise BackendSpecError(f"--backend {spec!r}: expected KEY=VALUE with KEY one of "
                                   f"{', '.join(_SPEC_KEYS)}, got {option!r}")
        values[key] = value

    def number(key: str, default: int | None, low: int, high: int) -> int | None:
        text = values.get(key)
        if text is None:
            return default
        if not text.isdigit() or not low <= int(text) <= high:
            raise BackendSpecError(f"--backend {spec!r}: {key}: expected an integer from {low} to {high}, "
                                   f"got {text!r}")
        return int(text)

    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise BackendSpecError(f"--backend {spec!r}: expected a port from 1 to 65535, got {port}")
    name = values.get("name", f"box{index + 1}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise BackendSpecError(f"--backend {spec!r}: name: expected letters, digits, '_', '.', '-', got {name!r}")
    return Backend(name=name, host=match["v6"] or match["host"], port=port,
                   agent_port=number("agent-port", agent_port, 1, 65535) or agent_port,
                   maxconn=number("maxconn", maxconn, 1, 1_000_000), weight=number("weight", 100, 1, 256) or 100)


def query_agent(host: str, agent_port: int, timeout_s: float = 3.0) -> str:
    """The line a box's agent check answers now (OSError when nothing answers)."""
    with socket.create_connection((host, agent_port), timeout=timeout_s) as sock:
        data = b""
        while b"\n" not in data and len(data) < 1024:
            chunk = sock.recv(1024)
            if not chunk:
                break
            data += chunk
    return data.split(b"\n", 1)[0].decode("ascii", errors="replace").strip()


def maxconn_of(reply: str) -> int | None:
    """The `maxconn:N` word of an agent reply, if any."""
    match = re.search(r"(?:^|[\s,])maxconn:(\d+)", reply)
    return int(match.group(1)) if match else None


def _duration(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _check_names(backends: Sequence[Backend]) -> None:
    seen: set[str] = set()
    for backend in backends:
        if backend.maxconn is None:
            raise BackendSpecError(f"--backend {backend.address}: no maxconn (give maxconn=N, "
                                   f"--max-num-seqs or --query)")
        if backend.name in seen:
            raise BackendSpecError(f"--backend: the name {backend.name!r} is used twice")
        seen.add(backend.name)
    if not backends:
        raise BackendSpecError("--backend: give at least one HOST:PORT")


def render(backends: Sequence[Backend], options: HAProxyOptions, *, command_line: str = "") -> str:
    """The whole haproxy.cfg. Raises BackendSpecError on duplicate names or no backends."""
    _check_names(backends)
    if options.balance not in BALANCE_ALGORITHMS:
        raise ValueError(f"balance: expected one of {BALANCE_ALGORITHMS}, got {options.balance!r}")
    o = options
    out: list[str] = []
    add = out.append
    add(f"# HAProxy 2.6 configuration for {len(backends)} llm-appliance box(es), written by llm-appliance "
        f"{__version__}:")
    add(f"#   {command_line}" if command_line else "#   llm-appliance fleet haproxy ...")
    add("# Check it with `haproxy -c -f FILE`; install it as /etc/haproxy/haproxy.cfg and")
    add("# `systemctl reload haproxy`. docs/fleet.md explains each part and the upgrade procedure.")
    add("")
    add("global")
    add(f"    log {o.log_target} local0")
    if o.chroot:
        add(f"    chroot {o.chroot}")
    if o.user:
        add(f"    user {o.user}")
        add(f"    group {o.user}")
    if o.daemon:
        add("    daemon")
    if o.stats_socket:
        add("    # `echo 'show servers state' | socat stdio unix:SOCKET` lists each box's state and weight.")
        add(f"    stats socket {o.stats_socket} mode 660 level admin")
    add(f"    maxconn {o.max_connections}")
    add("    # Request bodies are buffered to hash them and to retry them: a request is retried only")
    add(f"    # when it fits in one buffer ({o.buffer_bytes} bytes, a prompt of ~{o.buffer_bytes // 4} tokens).")
    add("    # Larger requests are still served, hashed on their first bytes, never retried.")
    add(f"    tune.bufsize {o.buffer_bytes}")
    add("")
    add("defaults")
    add("    mode http")
    add("    log global")
    add("    option httplog")
    add("    option dontlognull")
    add("    timeout connect 3s")
    add("    # A box says nothing until a non-streamed generation is done, and a stream may pause")
    add("    # between tokens under load: these bound silence, not the length of a stream.")
    add(f"    timeout client {_duration(o.request_timeout_s)}")
    add(f"    timeout server {_duration(o.request_timeout_s)}")
    add("    timeout http-request 30s")
    add("    timeout http-keep-alive 10s")
    add("    # Requests wait here while every box they may go to has maxconn requests in flight.")
    add("    timeout queue 60s")
    add(f"    timeout check {_duration(min(o.check_interval_s, 2.0))}")
    add("")
    add("frontend llm")
    add(f"    bind {o.bind}")
    add("    # The client's Authorization header passes through unchanged: every box checks API keys")
    add("    # itself, so keep [[clients]] the same on every box. Quotas are counted per box.")
    add("    default_backend appliances")
    add("")
    add("backend appliances")
    if o.balance == "prefix":
        _affinity(add, o)
    else:
        add("    # Round robin: no prefix affinity (for comparison; every box caches every prefix).")
        add("    balance roundrobin")
    add("")
    add("    # A request that got no answer is sent again, to another box: the box was down")
    add("    # (conn-failure), died before answering (empty-response), or is draining (503).")
    add("    # Generation has no side effects, so a request that never reached a client is safe to")
    add("    # repeat; a stream already under way is never retried (HAProxy cannot, and must not).")
    add(f"    retries {o.retries}")
    add("    retry-on conn-failure empty-response 503")
    add("    option redispatch 1")
    add("    # Which box answered, for debugging affinity.")
    add("    http-response set-header X-Served-By %[srv_name]")
    add("")
    add("    # Health: /health answers 200 only while the engine makes progress (503 while draining,")
    add("    # stalled or dead). A draining box is still healthy: its body says \"engine\": \"ok\" and the")
    add("    # agent check below takes it out of rotation (DRAIN), so its streams finish undisturbed.")
    add("    # A hung box (no answer within `timeout check`) or a stalled engine leaves the pool")
    add(f"    # after {o.check_fall} failed checks, {_duration(o.check_interval_s)} apart.")
    add("    option httpchk GET /health")
    add('    http-check expect rstring "\\"engine\\": *\\"ok\\""')
    add("    # The agent check (each box's [fleet] port) answers ready / drain / maint from the box's")
    add("    # phase (`llm-appliance ctl drain` -> drain), a weight from its load (KV cache, waiting")
    add("    # requests) and maxconn from its engine.max_num_seqs. The maxconn below holds until the")
    add("    # first agent answer.")
    add(f"    default-server check inter {_duration(o.check_interval_s)} fall {o.check_fall} rise {o.check_rise}"
        f" agent-check agent-inter {_duration(o.agent_interval_s)}")
    for b in backends:
        add(f"    server {b.name} {b.address} agent-port {b.agent_port} maxconn {b.maxconn} weight {b.weight}")
    if o.stats_bind:
        add("")
        add("listen stats")
        add(f"    bind {o.stats_bind}")
        add("    stats enable")
        add("    stats uri /")
        add("    stats refresh 5s")
    return "\n".join(out) + "\n"


def _affinity(add: Callable[[str], None], o: HAProxyOptions) -> None:
    n = o.hash_bytes
    add("    # Affinity: requests whose prompt starts alike go to the same box, whose prefix cache")
    add("    # already holds that start (a shared system prompt, a conversation's first message).")
    add(f"    # The key is the first {n} bytes of the first chat message's text, else of the")
    add("    # completion prompt, else of the body; the body is read from the buffer (bounded by")
    add("    # tune.bufsize), never waited for beyond `timeout http-request`.")
    add("    option http-buffer-request")
    rules = [
        "req.body,json_query('$.messages[0].content')",
        "req.body,json_query('$.messages[0].content[0].text')",  # content given as parts
        "req.body,json_query('$.prompt')",  # a string prompt (token-id prompts fall through)
        "req.body",
    ]
    for i, expr in enumerate(rules):
        cond = "" if i == 0 else " unless { var(txn.prefix_key) -m found }"
        add(f"    http-request set-var(txn.prefix_key) {expr},bytes(0,{n}){cond}")
    add("    # Consistent hashing: a box leaving or joining moves only its own share of the keys.")
    add(f"    # Bounded load: no box takes more than {o.balance_factor_percent}% of the average number of")
    add("    # requests in flight; past that, a key's next box on the ring takes the request, so one")
    add("    # hot prefix cannot overload its box. Requests without a key (GET) go round robin.")
    add("    balance hash var(txn.prefix_key)")
    add("    hash-type consistent")
    add(f"    hash-balance-factor {o.balance_factor_percent}")
