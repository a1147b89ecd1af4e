"""One server for the [apps] tests (structured outputs, tools, Responses API, SDK integrations):
the shared engine behind a real aiohttp app on loopback, built once per session (a module
imports the `apps_served` fixture)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from appliance.config import AppConfig
from appliance.server.app import make_app, start_site
from appliance.server.state import ServiceState
from tests.server.conftest import Served


@pytest.fixture(scope="session")
def apps_served(server_loop: Any, engine: Any) -> Iterator[Served]:
    async def up() -> tuple[Any, Served]:
        config = AppConfig()
        state = ServiceState("ready")
        app = make_app(config, engine, state)
        runner, port = await start_site(app, "127.0.0.1", 0)
        return runner, Served(f"http://127.0.0.1:{port}", app, state, engine, config)

    runner, served = server_loop.call(up())
    yield served
    server_loop.call(runner.cleanup())
