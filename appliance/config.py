"""Configuration: frozen dataclasses, read from TOML once (see `load_config`).

The engine part (`ModelConfig`, `CacheConfig`, `SchedulerConfig`, `EngineConfig`) uses the names
vLLM users know. The daemon part (`ServerConfig`, `ClientConfig`, `LoggingConfig`,
`ControlConfig`, `AppConfig`) describes the appliance. Every field has a default so the daemon
runs with no file at all; `etc/appliance.toml` documents each key.

NOTE: this module imports only the standard library (the dashboard reads it without torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class SchedulerConfig:
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped at 8192 on CPU)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    enforce_eager: bool = False  # GPU: skip CUDA graph capture
    # Decode batch sizes captured as CUDA graphs (padded replay). Empty: a default ladder.
    cuda_graph_batch_sizes: tuple[int, ...] = ()


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
    default_max_tokens: int | None = None  # None: up to max_model_len


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
class AppConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    clients: tuple[ClientConfig, ...] = ()
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    source_path: str | None = None  # the TOML file this came from, for messages
