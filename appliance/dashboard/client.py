"""The dashboard's async client of the control socket (aiohttp over AF_UNIX).

Every answer is a wire type of appliance/status.py. Errors are of two kinds, as for `ctl`:
`OSError` when the daemon cannot be reached (no socket, nobody listening, permission denied; the
dashboard shows a banner and reconnects) and `ControlError` when the daemon answers with an error
(the dashboard shows its message as a notification).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from appliance.ctl import ControlError, error_message
from appliance.status import (
    CancelResult,
    LogLevelResult,
    PhaseResult,
    RateHistory,
    ReloadResult,
    RequestList,
    RequestRow,
    StatusSnapshot,
    from_json,
    parse_event,
)

REQUEST_TIMEOUT_S = 10.0
# No event for this long means the daemon is gone even if the socket stays open (it sends one a second).
EVENTS_IDLE_TIMEOUT_S = 10.0


class DaemonSource(Protocol):
    """Where the dashboard gets its daemon data from: the control socket, or (in tests) recorded
    snapshots."""

    description: str

    async def status(self) -> StatusSnapshot: ...
    async def requests(self) -> list[RequestRow]: ...
    async def history(self) -> RateHistory: ...
    def events(self) -> AsyncIterator[StatusSnapshot | RequestList]: ...
    async def cancel(self, request_id: str) -> CancelResult: ...
    async def drain(self) -> PhaseResult: ...
    async def resume(self) -> PhaseResult: ...
    async def reload(self) -> ReloadResult: ...
    async def set_log_level(self, level: str) -> LogLevelResult: ...
    async def close(self) -> None: ...


class ControlSocketClient:
    """DaemonSource over the daemon's control socket. One aiohttp session, opened lazily (it
    belongs to the event loop that first uses it)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.description = socket_path
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path),
                timeout=aiohttp.ClientTimeout(total=None, connect=REQUEST_TIMEOUT_S))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                async with self._http().request(method, f"http://control{path}", json=body) as response:
                    data = await response.json(content_type=None) if response.content_length != 0 else None
                    if response.status >= 400:
                        raise ControlError(response.status, error_message(response.status, data))
                    return data
        except aiohttp.ClientConnectorError as e:
            raise e.os_error from None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ConnectionError(f"control socket {self.socket_path}: {e or type(e).__name__}") from e

    async def status(self) -> StatusSnapshot:
        return from_json(StatusSnapshot, await self._call("GET", "/status"))

    async def requests(self) -> list[RequestRow]:
        return from_json(RequestList, await self._call("GET", "/requests")).requests

    async def history(self) -> RateHistory:
        return from_json(RateHistory, await self._call("GET", "/history"))

    async def cancel(self, request_id: str) -> CancelResult:
        return from_json(CancelResult, await self._call("POST", f"/requests/{quote(request_id, safe='')}/cancel"))

    async def drain(self) -> PhaseResult:
        return from_json(PhaseResult, await self._call("POST", "/drain"))

    async def resume(self) -> PhaseResult:
        return from_json(PhaseResult, await self._call("POST", "/resume"))

    async def reload(self) -> ReloadResult:
        return from_json(ReloadResult, await self._call("POST", "/reload"))

    async def set_log_level(self, level: str) -> LogLevelResult:
        return from_json(LogLevelResult, await self._call("PUT", "/log-level", {"level": level}))

    async def events(self) -> AsyncIterator[StatusSnapshot | RequestList]:
        """The /events stream until it ends; raises OSError/ConnectionError when it breaks."""
        try:
            async with self._http().get("http://control/events") as response:
                if response.status >= 400:
                    raise ControlError(response.status, f"/events answered HTTP {response.status}")
                event: str | None = None
                while True:
                    async with asyncio.timeout(EVENTS_IDLE_TIMEOUT_S):
                        raw = await response.content.readline()
                    if not raw:
                        raise ConnectionResetError(f"the daemon closed {self.socket_path}")
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("event: "):
                        event = line.removeprefix("event: ")
                    elif line.startswith("data: ") and event is not None:
                        yield parse_event(event, line.removeprefix("data: "))
                        event = None
        except aiohttp.ClientConnectorError as e:
            raise e.os_error from None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ConnectionError(f"control socket {self.socket_path}: {e or type(e).__name__}") from e
