"""Wire types of the control socket: what `/status`, `/requests` and `/events` carry, and the GPU
readings the dashboard samples from NVML.

One definition per field, used by the control server (appliance/server/control.py), `ctl` and the
dashboard: the server builds these, `to_json` turns them into JSON, `from_json` turns JSON back
into them. Standard library only, so `ctl` and the dashboard load in a blink and never pull in
torch or the server.

Compatibility: `from_json` ignores keys it does not know (a newer daemon) and fills fields that
have a default when a key is missing (an older daemon); a missing field without a default, or a
value of the wrong type, is a `WireError` naming the field.

Units are in the names (`_s`, `_bytes`, `_w`, `_mhz`, `_c`, `_percent`); None means "not
reported" and is shown as N/A.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

T = TypeVar("T")

PHASES = ("loading", "ready", "draining", "stopping")


class WireError(ValueError):
    """JSON that does not fit a wire type; the message names the field path."""


# ----- daemon side: /status and /events `stats` -----------------------------------------------


@dataclass(frozen=True)
class EngineStatus:
    """The engine's own figures (cumulative counters are since the daemon started)."""

    progressing: bool  # a step finished within the stall timeout, or there is nothing to do
    dead: bool
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1 of the KV blocks referenced by live sequences
    num_kv_blocks_total: int
    num_kv_blocks_used: int
    num_kv_blocks_cached: int  # free but holding a reusable prefix
    prefix_cache_hit_rate: float  # 0..1, cumulative hits / queries in tokens
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_steps: int
    kernel_compiles: int = 0  # Triton compiles after the warm-up: each held a step (engine/compile_watch.py)
    gc_long_pauses: int = 0  # collector pauses >= 50 ms in the engine's process (appliance/gc_watch.py)
    # launched steps by how they ran (decode/cascade/prefill graph, piecewise graphs, eager), cumulative
    steps_by_path: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_stats(cls, stats: Any, *, progressing: bool, dead: bool) -> EngineStatus:
        """From the engine's `EngineStats` (or anything with the same attribute names): every
        field but the two given is read by its own name, so a renamed field fails loudly here."""
        given = {"progressing": progressing, "dead": dead}
        return cls(**given, **{f.name: getattr(stats, f.name) for f in dataclasses.fields(cls)
                               if f.name not in given})


@dataclass(frozen=True)
class Throughput:
    """Rates over the last `window_s` seconds, from counters sampled once a second."""

    prompt_tokens_per_s: float = 0.0
    generation_tokens_per_s: float = 0.0
    requests_per_s: float = 0.0  # requests finished (any finish reason)
    window_s: float = 0.0


@dataclass(frozen=True)
class Latency:
    """Quantiles over the last `window_s` seconds of finished requests, interpolated inside the
    /metrics histogram buckets (as Prometheus' histogram_quantile does). None: no sample."""

    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    inter_token_p50_s: float | None = None
    inter_token_p99_s: float | None = None
    num_requests: int = 0  # first tokens observed in the window
    window_s: float = 0.0


@dataclass(frozen=True)
class QueueStatus:
    running: int = 0  # in the engine's running batch
    waiting: int = 0  # in the engine's waiting queue
    admission_queued: int = 0  # admitted by the server, no first token yet
    rejected_total: int = 0  # 429s since start (quotas and the admission queue)
    rejected_last_minute: int = 0


@dataclass(frozen=True)
class ClientUsage:
    """One configured client: its traffic, and its use of its quotas (limit 0 = unlimited)."""

    name: str
    requests_total: int = 0  # answered, any status
    rejected_total: int = 0  # 429s
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    in_flight: int = 0
    requests_last_minute: int = 0
    tokens_last_minute: int = 0
    requests_per_minute_limit: int = 0
    tokens_per_minute_limit: int = 0
    max_concurrent_requests: int = 0


@dataclass(frozen=True)
class StatusSnapshot:
    """GET /status, and the `stats` event of GET /events (once a second)."""

    version: str
    pid: int
    phase: str  # one of PHASES
    model: str | None
    uptime_s: float
    http_address: str | None
    log_level: str
    inflight: int
    config_path: str | None = None
    engine: EngineStatus | None = None  # None while the model loads
    throughput: Throughput = field(default_factory=Throughput)
    latency: Latency = field(default_factory=Latency)
    queue: QueueStatus = field(default_factory=QueueStatus)
    clients: list[ClientUsage] = field(default_factory=list)
    daemon_gc_long_pauses: int = 0  # collector pauses >= 50 ms in the daemon's process (every stream waits)


@dataclass(frozen=True)
class RateHistory:
    """GET /history: the `throughput` figures of the last minutes, one per `interval_s`, oldest
    first, so a dashboard that just connected draws full sparklines."""

    interval_s: float = 1.0
    generation_tokens_per_s: list[float] = field(default_factory=list)
    prompt_tokens_per_s: list[float] = field(default_factory=list)
    requests_per_s: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class RequestRow:
    """One request in flight. NOTE: never any prompt or output text."""

    id: str
    client: str
    route: str
    phase: str  # queued, waiting, prefill, decode, finishing
    prompt_tokens: int
    completion_tokens: int
    age_s: float
    tokens_per_s: float = 0.0  # output tokens per second over the last sample (~1 s)


@dataclass(frozen=True)
class RequestList:
    """GET /requests, and the `requests` event of GET /events."""

    requests: list[RequestRow] = field(default_factory=list)


# ----- answers to actions -----------------------------------------------------------------------


@dataclass(frozen=True)
class CancelResult:
    request_id: str
    cancelled: bool


@dataclass(frozen=True)
class PhaseResult:
    """POST /drain and /resume."""

    phase: str
    inflight: int | None = None


@dataclass(frozen=True)
class ReloadResult:
    applied: list[str]
    clients: list[str]
    needs_restart: list[str]


@dataclass(frozen=True)
class LogLevelResult:
    level: str


@dataclass(frozen=True)
class ErrorBody:
    """`{"error": {"message", "type"}}` of every 4xx/5xx answer."""

    message: str
    type: str


# ----- GPU side (the dashboard's NVML sampler; no daemon involved) -------------------------------


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str | None = None
    used_memory_bytes: int | None = None


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one instant. Every figure is None when the GPU or driver does not report it."""

    index: int
    name: str | None = None
    uuid: str | None = None
    utilization_percent: float | None = None
    memory_utilization_percent: float | None = None  # memory controller busy time
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: int | None = None
    sm_clock_max_mhz: int | None = None
    memory_clock_mhz: int | None = None
    memory_clock_max_mhz: int | None = None
    fan_percent: float | None = None
    throttle_reasons: list[str] | None = None  # [] = not throttled
    ecc_errors_corrected: int | None = None  # volatile (since the driver loaded)
    ecc_errors_uncorrected: int | None = None
    processes: list[GpuProcess] | None = None


@dataclass(frozen=True)
class GpuSnapshot:
    """All GPUs of the machine, or why there are none (`error`: e.g. no NVIDIA driver)."""

    gpus: list[GpuReading] = field(default_factory=list)
    driver_version: str | None = None
    error: str | None = None
    sampled_at_s: float = 0.0  # time.time()


# ----- JSON ------------------------------------------------------------------------------------


def to_json(obj: Any) -> Any:
    """A wire dataclass (or list of them) as JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_json(x) for x in obj]
    if isinstance(obj, float):
        return round(obj, 6)  # six decimals is a microsecond, or a millionth of a ratio
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(to_json(obj), separators=(",", ":"))


def from_json(cls: type[T], data: Any, path: str = "") -> T:
    """Build wire type `cls` from parsed JSON; raises WireError naming the bad field."""
    return _decode(cls, data, path or cls.__name__)


def loads(cls: type[T], text: str | bytes) -> T:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise WireError(f"{cls.__name__}: not JSON: {e}") from None
    return from_json(cls, data)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    return hints


def _decode(tp: Any, data: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{path}: unions other than `X | None` are not wire types")
        return _decode(inner[0], data, path)
    if origin is list:
        if not isinstance(data, list):
            raise WireError(f"{path}: expected a list, got {type(data).__name__}")
        (item,) = typing.get_args(tp)
        return [_decode(item, x, f"{path}[{i}]") for i, x in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise WireError(f"{path}: expected an object, got {type(data).__name__}")
        key, value = typing.get_args(tp)
        if key is not str:
            raise TypeError(f"{path}: only str-keyed dicts are wire types")
        return {k: _decode(value, v, f"{path}.{k}") for k, v in data.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise WireError(f"{path}: expected an object, got {type(data).__name__}")
        hints = _hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in data:
                kwargs[f.name] = _decode(hints[f.name], data[f.name], f"{path}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise WireError(f"{path}.{f.name}: missing")
        return tp(**kwargs)
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise WireError(f"{path}: expected a number, got {data!r}")
        return float(data)
    if tp in (int, str, bool):
        if not isinstance(data, tp) or (tp is int and isinstance(data, bool)):
            raise WireError(f"{path}: expected {tp.__name__}, got {data!r}")
        return data
    if tp is Any:
        return data
    raise TypeError(f"{path}: {tp!r} is not a wire type")


# ----- /events (server-sent events) -------------------------------------------------------------

# event name -> the wire type of its `data:` line
EVENT_TYPES: dict[str, type] = {"stats": StatusSnapshot, "requests": RequestList}


def format_event(name: str, obj: Any) -> bytes:
    assert isinstance(obj, EVENT_TYPES[name]), (name, type(obj))
    return f"event: {name}\ndata: {dumps(obj)}\n\n".encode()


def parse_event(name: str, data: str) -> StatusSnapshot | RequestList:
    """Decode one event's data; WireError for an unknown event name or a bad body."""
    cls = EVENT_TYPES.get(name)
    if cls is None:
        raise WireError(f"unknown event {name!r}; expected one of {', '.join(EVENT_TYPES)}")
    return loads(cls, data)
