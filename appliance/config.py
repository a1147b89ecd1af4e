"""Configuration: frozen dataclasses, read from TOML once (see `load_config`).

The engine part (`ModelConfig`, `CacheConfig`, `SchedulerConfig`, `EngineConfig`) uses the names
vLLM users know. The daemon part (`ServerConfig`, `ClientConfig`, `LoggingConfig`,
`ControlConfig`, `FleetConfig`, `AppConfig`) describes the appliance. Every field has a default so the daemon
runs with no file at all; `etc/appliance.toml` documents each key.

NOTE: this module imports only the standard library (and appliance.errors) (the dashboard reads it without torch).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import ConfigError

DEFAULT_MODEL = "default"  # the embedded SmolLM2-135M-Instruct, fetched by `llm-appliance model fetch`


@dataclass(frozen=True)
class ModelConfig:
    """What to load. `model` is a local HF directory, a .gguf file, or "default".

    load_format: "auto" (safetensors dir or .gguf by path), "safetensors", "gguf", "dummy"
    (random weights; `model` is then an architecture name such as "llama-3.1-8b",
    "qwen2.5-7b", "smollm2-135m", or a directory holding a config.json).
    dtype: "auto" (bf16 on GPU, fp32 on CPU), "float32", "bfloat16", "float16".
    """

    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    tokenizer: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    seed: int = 0
    trust_remote_code: bool = False


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    # GPU: fraction of total device memory the process may use (weights + activations + KV).
    gpu_memory_utilization: float = 0.90
    # CPU: the KV cache budget in bytes (there is no device memory to measure).
    cpu_kv_cache_bytes: int = 1 << 30
    # Overrides both when set (tests use this to force preemption).
    num_kv_blocks: int | None = None
    # "auto": the model's dtype. "fp8": float8 e4m3 with per-tensor scales of 1.0 (uncalibrated,
    # as vLLM's kv_cache_dtype="fp8"): half the KV bytes of bf16, so twice the cached tokens and
    # half the attention reads in decode, at some accuracy cost. GPU: compute capability 8.9+.
    kv_cache_dtype: str = "auto"


@dataclass(frozen=True)
class SchedulerConfig:
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped at 8192 on CPU)
    max_num_seqs: int = 512  # W1-style bursts run as one wave (decode graphs go to 512)
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    # In a step that also decodes, at most this many prompt tokens (0: no cap but the step's
    # budget): a burst of prompts then cannot stretch one step, and every stream's gap in it, to
    # the time of a max_num_batched_tokens prefill. Only with chunked prefill.
    max_prefill_tokens_with_decodes: int = 0


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    enforce_eager: bool = False  # GPU: skip CUDA graph capture
    # Decode batch sizes captured as CUDA graphs (padded replay). Empty: a default ladder.
    cuda_graph_batch_sizes: tuple[int, ...] = ()
    # A step that prefills one sequence alone (a lone request's prompt) replays a CUDA graph padded
    # to the next of 16, 32, ... up to this many tokens: an eager 8B prefill spends ~15 ms of host
    # time launching ~300 kernels, more than the device needs for a short prompt. 0: eager.
    cuda_graph_prefill_max_tokens: int = 2048
    # The other steps (decodes with a prompt chunk, several prompts) replay CUDA graphs cut at each
    # layer's attention, padded to a ladder of token counts up to this many (attention runs eagerly
    # between the pieces, appliance/engine/piecewise.py). Capped at max_num_batched_tokens; 0: such
    # steps run eager. On an H200 the 135M offline W1 went from 56-70k to 82-108k tok/s
    # (docs/ARCHITECTURE.md, "Piecewise graphs").
    cuda_graph_piecewise_max_tokens: int = 8192
    # Schedule and launch step N before step N-1's sampled ids reach the host, so the host work
    # of a step (scheduling, inputs, stop checks, outputs) overlaps the device's forward pass.
    # Same tokens either way; False: the plain schedule -> execute -> update loop.
    async_scheduling: bool = True
    # Decode steps whose sequences all start with the same KV blocks (a shared system prompt, n > 1
    # choices) attend that prefix once for the whole batch (cascade attention) when it is long and
    # the batch big enough: "auto"; "off": plain decode always.
    cascade_attention: str = "auto"
    # Where the engine core runs: "separate" (its own process: its host work and the HTTP side
    # do not share one GIL), "inline" (a thread of the daemon), "auto" (separate on CUDA).
    process: str = "auto"


@dataclass(frozen=True)
class ClientConfig:
    """One named API key and its quotas. 0 means unlimited."""

    name: str
    api_key: str = field(default="", repr=False)
    api_key_file: str | None = None  # read at start and on SIGHUP; may be a systemd credential
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent_requests: int = 0


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 << 20
    cors_allow_origins: tuple[str, ...] = ()  # empty: CORS off
    metrics_require_auth: bool = False
    # Admission queue: beyond these, requests get 429 at once.
    max_queued_requests: int = 1024
    max_queued_tokens: int = 1 << 22
    drain_timeout_s: float = 30.0
    # Start-up: the daemon asks systemd for this long to load and warm up the model
    # (EXTEND_TIMEOUT_USEC), so a slow load is not killed while a hung one still is.
    load_timeout_s: float = 600.0
    # The watchdog (and /health) call the engine stuck when it has work and no step finished
    # for this long.
    stall_timeout_s: float = 30.0
    default_max_tokens: int | None = None  # None: up to max_model_len
    # The model's tool-call format: "auto" reads it from the chat template (server/tool_parsers.py).
    tool_call_parser: str = "auto"


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    request_log_path: str | None = None  # JSON lines; None: no request log file
    log_request_text: bool = False  # prompts and outputs are never logged unless this is true


@dataclass(frozen=True)
class ControlConfig:
    socket_path: str = "/run/llm-appliance/control.sock"
    group: str | None = "llm-appliance"
    mode: int = 0o660


@dataclass(frozen=True)
class FleetConfig:
    """Several boxes behind HAProxy: the agent-check port HAProxy asks for this box's state and
    weight (see appliance/fleet/agent_check.py and docs/fleet.md). Off unless enabled."""

    enabled: bool = False
    host: str | None = None  # None: the same address as server.host (HAProxy reaches both there)
    port: int = 8001
    # How many HAProxy instances check this box: each is offered max_num_seqs / load_balancers
    # connections, so together they never send more than one batch can hold.
    load_balancers: int = 1


@dataclass(frozen=True)
class AppConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    clients: tuple[ClientConfig, ...] = ()
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    source_path: str | None = None  # the TOML file this came from, for messages


# --------------------------------------------------------------------------------------------
# Loading: TOML -> the dataclasses above, validated once.
# --------------------------------------------------------------------------------------------
# NOTE: everything below is the one place a config file is read. The TOML layout is flat per
# section: [model] is ModelConfig, [engine] holds CacheConfig + SchedulerConfig + the top-level
# EngineConfig fields, [server], [logging], [control], [fleet], and [[clients]] (one table per API key).

EX_CONFIG = 78  # sysexits.h: the exit status for a bad configuration (systemd: RestartPreventExitStatus)
COMMAND_LINE = "command line"
SECRET_MASK = "********"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# section -> the dataclasses whose fields it holds (engine is spread over three).
_SECTIONS: dict[str, tuple[type, ...]] = {
    "model": (ModelConfig,),
    "engine": (CacheConfig, SchedulerConfig, EngineConfig),
    "server": (ServerConfig,),
    "logging": (LoggingConfig,),
    "control": (ControlConfig,),
    "fleet": (FleetConfig,),
}
_ENGINE_NESTED = {"model", "cache", "scheduler"}  # EngineConfig fields that are sections, not keys
_MODE_KEY = "control.mode"


def _positive(v: Any) -> bool:
    return v >= 1


def _non_negative(v: Any) -> bool:
    return v >= 0


# dotted key -> (is the value possible, what is expected). Types are checked before these.
_VALUE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.model": (bool, "a model directory, a .gguf file or \"default\""),
    "model.load_format": (lambda v: v in ("auto", "safetensors", "gguf", "dummy"),
                          "one of \"auto\", \"safetensors\", \"gguf\", \"dummy\""),
    "model.dtype": (lambda v: v in ("auto", "float32", "bfloat16", "float16"),
                    "one of \"auto\", \"float32\", \"bfloat16\", \"float16\""),
    "model.device": (lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"),
                     "one of \"auto\", \"cpu\", \"cuda\", \"cuda:N\""),
    "engine.block_size": (lambda v: 1 <= v <= 256 and v & (v - 1) == 0, "a power of two from 1 to 256"),
    "engine.gpu_memory_utilization": (lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]"),
    "engine.cpu_kv_cache_bytes": (_positive, "a byte count >= 1"),
    "engine.num_kv_blocks": (_positive, "an integer >= 1 (or leave it unset)"),
    "engine.kv_cache_dtype": (lambda v: v in ("auto", "fp8"), "one of \"auto\", \"fp8\""),
    "engine.max_model_len": (_positive, "an integer >= 1 (or leave it unset)"),
    "engine.max_num_seqs": (_positive, "an integer >= 1"),
    "engine.max_num_batched_tokens": (_positive, "an integer >= 1"),
    "engine.max_prefill_tokens_with_decodes": (_non_negative,
                                               "an integer >= 0 (0: no cap but engine.max_num_batched_tokens)"),
    "engine.cuda_graph_batch_sizes": (lambda v: all(x >= 1 for x in v), "a list of integers >= 1"),
    "engine.cuda_graph_prefill_max_tokens": (_non_negative, "an integer >= 0 (0: lone prefills run eager)"),
    "engine.cuda_graph_piecewise_max_tokens": (lambda v: v == 0 or v >= 16,
                                               "0 (mixed and multi-prompt steps run eager) or an integer >= 16"),
    "engine.cascade_attention": (lambda v: v in ("auto", "off"), "one of \"auto\", \"off\""),
    "engine.process": (lambda v: v in ("auto", "inline", "separate"), "one of \"auto\", \"inline\", \"separate\""),
    "server.host": (bool, "a host name or address"),
    "server.port": (lambda v: 0 <= v <= 65535, "a port number from 0 to 65535"),
    "server.max_body_bytes": (_positive, "a byte count >= 1"),
    "server.max_queued_requests": (_positive, "an integer >= 1"),
    "server.max_queued_tokens": (_positive, "an integer >= 1"),
    "server.drain_timeout_s": (_non_negative, "a number of seconds >= 0"),
    "server.load_timeout_s": (lambda v: v > 0, "a number of seconds > 0"),
    "server.stall_timeout_s": (lambda v: v > 0, "a number of seconds > 0"),
    "server.default_max_tokens": (_positive, "an integer >= 1 (or leave it unset)"),
    "server.tool_call_parser": (lambda v: v in ("auto", "hermes", "llama3_json", "mistral"),
                                "one of \"auto\", \"hermes\", \"llama3_json\", \"mistral\""),
    "logging.level": (lambda v: v.upper() in LOG_LEVELS, "one of " + ", ".join(LOG_LEVELS)),
    "logging.request_log_path": (bool, "a file path (or leave it unset)"),
    # sun_path is 108 bytes including the terminating NUL.
    "control.socket_path": (lambda v: 0 < len(os.fsencode(v)) < 108, "a path shorter than 108 bytes"),
    "control.group": (bool, "a group name (or leave it unset)"),
    _MODE_KEY: (lambda v: 0 <= v <= 0o777, "a permission mode from 0o000 to 0o777, e.g. 0o660"),
    "fleet.host": (bool, "a host name or address (or leave it unset: server.host)"),
    "fleet.port": (lambda v: 1 <= v <= 65535, "a port number from 1 to 65535"),
    "fleet.load_balancers": (_positive, "an integer >= 1"),
    "clients.name": (bool, "a non-empty name"),
    "clients.requests_per_minute": (_non_negative, "an integer >= 0 (0: unlimited)"),
    "clients.tokens_per_minute": (_non_negative, "an integer >= 0 (0: unlimited)"),
    "clients.max_concurrent_requests": (_non_negative, "an integer >= 0 (0: unlimited)"),
}


def _section_fields(section: str) -> dict[str, tuple[type, Any]]:
    """key -> (owning dataclass, type hint) for one section."""
    out: dict[str, tuple[type, Any]] = {}
    for cls in _SECTIONS[section]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if cls is EngineConfig and f.name in _ENGINE_NESTED:
                continue
            out[f.name] = (cls, hints[f.name])
    return out


def _describe(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if type(None) in args:
        return _describe(next(a for a in args if a is not type(None)))
    return str(tp)


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value converted to the field's type). None is never a TOML value: unset keys are absent."""
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False, value
        items = [_coerce(v, args[0]) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        if value is None:
            return True, None
        return _coerce(value, next(a for a in args if a is not type(None)))
    raise TypeError(f"unsupported config type {tp!r}")


class _Loader:
    """Validates one merged raw dict; `origin(key)` says where each key came from for messages."""

    def __init__(self, path: str | None, overridden: set[str]) -> None:
        self.path = path
        self.overridden = overridden

    def fail(self, key: str, message: str) -> ConfigError:
        top = key.split("[")[0].split(".")[0]
        where = COMMAND_LINE if (key in self.overridden or top in self.overridden) else (self.path or COMMAND_LINE)
        return ConfigError(f"{where}: {key}: {message}", param=key)

    def value(self, key: str, check_key: str, raw: Any, tp: Any) -> Any:
        if key == _MODE_KEY and isinstance(raw, str):
            # TOML has octal integers (0o660); a quoted "0660" is accepted too, as chmod writes it.
            try:
                raw = int(raw, 8)
            except ValueError:
                raise self.fail(key, f"expected an octal permission mode such as 0o660, got {raw!r}") from None
        ok, value = _coerce(raw, tp)
        if not ok:
            raise self.fail(key, f"expected {_describe(tp)}, got {raw!r}")
        check = _VALUE_CHECKS.get(check_key)
        if check and value is not None and not check[0](value):
            raise self.fail(key, f"expected {check[1]}, got {raw!r}")
        if key == "logging.level":
            value = value.upper()
        return value

    def section(self, name: str, raw: Any) -> dict[type, dict[str, Any]]:
        if not isinstance(raw, Mapping):
            raise self.fail(name, f"expected a table [{name}], got {raw!r}")
        fields = _section_fields(name)
        out: dict[type, dict[str, Any]] = {cls: {} for cls in _SECTIONS[name]}
        for key, raw_value in raw.items():
            dotted = f"{name}.{key}"
            if key not in fields:
                raise self.fail(dotted, "unknown key" + _did_you_mean(key, fields))
            cls, tp = fields[key]
            out[cls][key] = self.value(dotted, dotted, raw_value, tp)
        return out

    def clients(self, raw: Any) -> tuple[ClientConfig, ...]:
        if not isinstance(raw, list):
            raise self.fail("clients", f"expected an array of tables [[clients]], got {raw!r}")
        hints = typing.get_type_hints(ClientConfig)
        names = {f.name for f in dataclasses.fields(ClientConfig)}
        result: list[ClientConfig] = []
        for i, entry in enumerate(raw):
            prefix = f"clients[{i}]"
            if not isinstance(entry, Mapping):
                raise self.fail(prefix, f"expected a table with name and api_key, got {entry!r}")
            kwargs: dict[str, Any] = {}
            for key, raw_value in entry.items():
                if key not in names:
                    raise self.fail(f"{prefix}.{key}", "unknown key" + _did_you_mean(key, names))
                kwargs[key] = self.value(f"{prefix}.{key}", f"clients.{key}", raw_value, hints[key])
            if "name" not in kwargs:
                raise self.fail(f"{prefix}.name", "missing: every client needs a name")
            kwargs["api_key"] = self.client_key(prefix, kwargs)
            result.append(ClientConfig(**kwargs))
        seen_names: set[str] = set()
        seen_keys: set[str] = set()
        for i, client in enumerate(result):
            if client.name in seen_names:
                raise self.fail(f"clients[{i}].name", f"expected a unique name, {client.name!r} is used twice")
            if client.api_key in seen_keys:
                raise self.fail(f"clients[{i}].api_key", "expected a unique key, two clients share one")
            seen_names.add(client.name)
            seen_keys.add(client.api_key)
        return tuple(result)

    def client_key(self, prefix: str, kwargs: dict[str, Any]) -> str:
        key, key_file = kwargs.get("api_key", ""), kwargs.get("api_key_file")
        if key and key_file:
            raise self.fail(f"{prefix}.api_key", "set api_key or api_key_file, not both")
        if key_file:
            return read_key_file(key_file, lambda msg: self.fail(f"{prefix}.api_key_file", msg))
        if not key:
            raise self.fail(f"{prefix}.api_key", "missing: set api_key or api_key_file")
        return key


def _did_you_mean(key: str, known: Mapping[str, Any] | set[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (expected one of: {', '.join(sorted(known))})"


def resolve_key_file(key_file: str) -> str:
    """A bare name (no '/') is a systemd credential when $CREDENTIALS_DIRECTORY is set
    (LoadCredential=NAME:PATH in the unit), so the key never sits in a world-readable file."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and "/" not in key_file:
        return os.path.join(creds, key_file)
    return key_file


def read_key_file(key_file: str, fail: Callable[[str], ConfigError]) -> str:
    path = resolve_key_file(key_file)
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except OSError as e:
        raise fail(f"expected a readable file holding one API key, cannot read {path!r}: {e.strerror}") from None
    if not key or "\n" in key:
        raise fail(f"expected {path!r} to hold exactly one non-empty line (the API key)")
    return key


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def load_config(path: str | None, overrides: Mapping[str, Any] | None = None) -> AppConfig:
    """Read `path` (TOML; None: no file) and apply `overrides`, then validate everything once.

    overrides: dotted keys as in the file ("server.port", "model.model", "engine.max_num_seqs",
    or "clients" with a list of tables) -> values; None values are ignored (flag not given).
    Raises ConfigError naming the file (or "command line"), the dotted key and what is expected.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    overridden: set[str] = set()
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
            overridden.add(dotted)
    loader = _Loader(path, overridden)

    parts: dict[type, dict[str, Any]] = {}
    clients: tuple[ClientConfig, ...] = ()
    for name, section in raw.items():
        if name == "clients":
            clients = loader.clients(section)
        elif name in _SECTIONS:
            parts.update(loader.section(name, section))
        else:
            raise loader.fail(name, "unknown section" + _did_you_mean(name, set(_SECTIONS) | {"clients"}))

    def build(cls: type) -> Any:
        return cls(**parts.get(cls, {}))

    scheduler = build(SchedulerConfig)
    if scheduler.max_num_batched_tokens < scheduler.max_num_seqs:
        raise loader.fail("engine.max_num_batched_tokens",
                          f"expected an integer >= engine.max_num_seqs ({scheduler.max_num_seqs}), "
                          f"got {scheduler.max_num_batched_tokens}")
    engine = EngineConfig(model=build(ModelConfig), cache=build(CacheConfig), scheduler=scheduler,
                          **parts.get(EngineConfig, {}))
    server, fleet = build(ServerConfig), build(FleetConfig)
    if fleet.enabled and fleet.port == server.port and (fleet.host or server.host) == server.host:
        raise loader.fail("fleet.port", f"expected a port other than server.port ({server.port}), "
                                        f"got {fleet.port}")
    return AppConfig(engine=engine, server=server, clients=clients, logging=build(LoggingConfig),
                     control=build(ControlConfig), fleet=fleet, source_path=path)


def config_to_toml_dict(config: AppConfig, *, mask_secrets: bool = True) -> dict[str, Any]:
    """The effective config in the file's layout (for `config show`). Unset (None) keys are left
    out, as TOML has no null; the control mode is written as an octal string."""

    def table(*objs: Any, skip: Collection[str] = ()) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for obj in objs:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if f.name in skip or value is None:
                    continue
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    e = config.engine
    doc: dict[str, Any] = {
        "model": table(e.model),
        "engine": table(e.cache, e.scheduler, e, skip=_ENGINE_NESTED),
        "server": table(config.server),
        "logging": table(config.logging),
        "control": table(config.control),
        "fleet": table(config.fleet),
    }
    doc["control"]["mode"] = f"0{config.control.mode:o}"
    clients = []
    for client in config.clients:
        entry = table(client)
        if mask_secrets and entry.get("api_key"):
            entry["api_key"] = SECRET_MASK
        clients.append(entry)
    if clients:
        doc["clients"] = clients
    return doc
