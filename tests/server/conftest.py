"""Server fixtures: the real default model on CPU behind a real aiohttp server on loopback.

The server side (AsyncEngine + apps) lives on an event loop in a background thread, so tests can
use both the sync and the async `openai` clients against it. One engine is shared by the
session (model load and warm-up cost seconds); each test builds the app it needs around it.
Every test that uses it runs twice: with the core on a thread of this process ("inline") and
in an engine process of its own ("separate"), the two `EngineCoreClient`s.

The gate freezes the engine deterministically (requests admitted but not progressing), which is
how the queue bound, the concurrency quota and the stall detection are tested exactly: inline,
`GatedCore` wraps the real `EngineCore` with an event its `step()` waits on; separate, the
engine process's test-only stall file (`TEST_STALL_FILE_ENV`) blocks its steps while it exists.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import openai
import pytest

from appliance.config import AppConfig, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from appliance.engine.async_engine import AsyncEngine
from appliance.engine.core_client import TEST_STALL_FILE_ENV, InprocClient
from appliance.server.app import make_app, start_site
from appliance.server.state import ServiceState

T = TypeVar("T")
MAX_MODEL_LEN = 1024


def engine_config(model_dir: Path, kv_bytes: int = 128 << 20) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype="float32", device="cpu"),
        cache=CacheConfig(cpu_kv_cache_bytes=kv_bytes),
        scheduler=SchedulerConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=64),
    )


class GatedCore:
    """The real EngineCore, with a gate `step()` waits on and an optional failure to inject."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.tokenizer = core.tokenizer
        self.model_name = core.model_name
        self.max_model_len = core.max_model_len
        self.vocab_size = core.vocab_size
        self.gate = threading.Event()
        self.gate.set()
        self.fail_after_steps: int | None = None  # raise in step() once this many more steps ran

    def add_request(self, *args: Any, **kwargs: Any) -> None:
        self.core.add_request(*args, **kwargs)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[Any]:
        self.gate.wait()
        if self.fail_after_steps is not None:
            if self.fail_after_steps <= 0:
                raise RuntimeError("injected engine failure")
            self.fail_after_steps -= 1
        return self.core.step()

    def stats(self, include_requests: bool = False) -> Any:
        return self.core.stats(include_requests=include_requests)


class FileGate:
    """The gate of an engine process: its steps block while the stall file exists."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self) -> None:
        self.path.unlink(missing_ok=True)

    def clear(self) -> None:
        self.path.touch()

    def is_set(self) -> bool:
        return not self.path.exists()


def inline_engine(core: Any) -> AsyncEngine:
    return AsyncEngine(InprocClient(core))


async def spawn_engine(config: EngineConfig, stall_file: Path | None = None) -> AsyncEngine:
    """An AsyncEngine over a real engine process (started); `stall_file` arms its gate."""
    from appliance.engine.core_process import ProcessClient

    saved = os.environ.get(TEST_STALL_FILE_ENV)
    if stall_file is not None:
        os.environ[TEST_STALL_FILE_ENV] = str(stall_file)  # the child reads it once, at start-up
    try:
        client = await ProcessClient.spawn(config)
    finally:
        if saved is None:
            os.environ.pop(TEST_STALL_FILE_ENV, None)
        else:
            os.environ[TEST_STALL_FILE_ENV] = saved
    engine = AsyncEngine(client)
    await engine.start()
    return engine


class ServerLoop:
    """An asyncio loop running in a thread: the server's side of every test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Served:
    base_url: str  # http://127.0.0.1:PORT
    app: Any
    state: ServiceState
    engine: AsyncEngine
    config: AppConfig

    def client(self, api_key: str = "none", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, **kwargs)

    def async_client(self, api_key: str = "none", **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, **kwargs)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll until `predicate()` holds (a wait, not a timing assertion: the bound only stops a hang)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from appliance.models.fetch import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.fixture(scope="session")
def server_loop() -> Iterator[ServerLoop]:
    loop = ServerLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def gated_core(default_model_dir: Path) -> GatedCore:
    from appliance.engine.llm_engine import EngineCore

    core = EngineCore(engine_config(default_model_dir))
    core.warmup()
    return GatedCore(core)


@pytest.fixture(scope="session", params=["inline", "separate"])
def engine_and_gate(request, server_loop: ServerLoop, default_model_dir: Path,
                    tmp_path_factory) -> Iterator[tuple[AsyncEngine, Any]]:
    if request.param == "inline":
        core = request.getfixturevalue("gated_core")

        async def start() -> AsyncEngine:
            eng = inline_engine(core)
            await eng.start()
            return eng

        eng, gate = server_loop.call(start()), core.gate
    else:
        gate = FileGate(tmp_path_factory.mktemp("gate") / "stall")
        eng = server_loop.call(spawn_engine(engine_config(default_model_dir), gate.path), timeout_s=600)
    yield eng, gate
    gate.set()
    server_loop.call(eng.shutdown())


@pytest.fixture(scope="session")
def engine(engine_and_gate: tuple[AsyncEngine, Any]) -> AsyncEngine:
    return engine_and_gate[0]


@pytest.fixture
def gate(engine_and_gate: tuple[AsyncEngine, Any]) -> Iterator[Any]:
    """The shared engine's gate; always reopened after the test."""
    gate = engine_and_gate[1]
    yield gate
    gate.set()


@pytest.fixture
def serve_own(server_loop: ServerLoop) -> Iterator[Callable[..., Served]]:
    """serve_own(engine, config=AppConfig(), state=None) -> Served: an app around an engine of the
    test's own (not the shared, parametrized one), torn down after the test."""
    runners = []

    def start(engine: AsyncEngine, config: AppConfig | None = None, state: ServiceState | None = None) -> Served:
        config = config or AppConfig()

        async def up() -> Served:
            st = state or ServiceState("ready")
            app = make_app(config, engine, st)
            runner, port = await start_site(app, "127.0.0.1", 0)
            runners.append(runner)
            return Served(f"http://127.0.0.1:{port}", app, st, engine, config)

        return server_loop.call(up())

    yield start
    for runner in runners:
        server_loop.call(runner.cleanup())


@pytest.fixture
def serve(serve_own: Callable[..., Served], engine: AsyncEngine) -> Iterator[Callable[..., Served]]:
    """serve(config=AppConfig(), engine=shared, state=None) -> Served, torn down after the test."""

    def start(config: AppConfig | None = None, engine_: AsyncEngine | None = None,
              state: ServiceState | None = None) -> Served:
        return serve_own(engine_ or engine, config, state)

    yield start
    # Every test leaves the shared engine idle, with every block back in the pool.
    wait_until(lambda: not engine.stats().num_running and not engine.stats().num_waiting
               and engine.stats().num_kv_blocks_used == 0, what="the shared engine to be idle")


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path) -> Any:
    """The default model's tokenizer, loaded the way the engine loads it (without the model)."""
    from appliance.models.tokenizer import load_tokenizer

    return load_tokenizer(str(default_model_dir))


def chat_prompt_len(tokenizer: Any, content: str) -> int:
    from appliance.models.tokenizer import apply_chat_template

    return len(apply_chat_template(tokenizer, [{"role": "user", "content": content}]))


MODEL = "SmolLM2-135M-Instruct"
os.environ.setdefault("OPENAI_LOG", "")  # the SDK's own logging stays off


@dataclass
class HttpResponse:
    status_code: int
    headers: dict[str, str]  # lower-case names
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode()


def http_request(method: str, url: str, *, json_body: Any = None, content: bytes | None = None,
         headers: dict[str, str] | None = None, timeout_s: float = 60.0) -> HttpResponse:
    """A plain HTTP/1.1 request with the standard library (raw bytes, any status)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    body = content if json_body is None else json.dumps(json_body).encode()
    all_headers = {"Content-Type": "application/json"} if body is not None else {}
    all_headers.update(headers or {})
    try:
        connection.request(method, parts.path or "/", body=body, headers=all_headers)
        response = connection.getresponse()
        return HttpResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()
