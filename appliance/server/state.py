"""The service's live state, shared by the HTTP app, the daemon and the control socket.

It lives on the event loop (no locks): the phase (loading → ready ⇄ draining → stopping), the
key ring and quotas (swapped live on SIGHUP), the admission queue, and the registry of requests
in flight. Routes enter a request through `admit()`, an async context manager that refuses it
(503 while not ready, 429 past a quota or the queue bound), books it, and always settles it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.config import ClientConfig, ServerConfig
from appliance.errors import EngineUnavailableError
from appliance.server.auth import KeyRing
from appliance.server.quotas import AdmissionQueue, QuotaBook, QuotaTicket

if TYPE_CHECKING:
    from appliance.engine.async_engine import AsyncEngine

PHASES = ("loading", "ready", "draining", "stopping")


class ServiceUnavailableError(EngineUnavailableError):
    """503 with a Retry-After."""

    def __init__(self, message: str, *, retry_after_s: float, code: str) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


@dataclass
class InflightRequest:
    request_id: str  # the completion id sent to the client ("chatcmpl-…", "cmpl-…")
    client: str
    route: str
    prompt_tokens: int
    engine_request_ids: list[str]
    started_monotonic: float = field(default_factory=time.monotonic)
    completion_tokens: int = 0
    queued: bool = True  # in the admission queue until its first token
    first_token_monotonic: float | None = None


class Admission:
    """A request's booking, handed out by `ServiceState.admit`. Routes report progress here."""

    def __init__(self, state: ServiceState, entry: InflightRequest, ticket: QuotaTicket) -> None:
        self._state = state
        self.entry = entry
        self.ticket = ticket

    def first_token(self) -> None:
        """The request got its first token: it leaves the admission queue."""
        entry = self.entry
        if entry.queued:
            entry.queued = False
            entry.first_token_monotonic = time.monotonic()
            self._state.admission.leave(entry.prompt_tokens)

    def progress(self, completion_tokens: int) -> None:
        if completion_tokens > 0:
            self.first_token()
        self.entry.completion_tokens = completion_tokens


class ServiceState:
    """See the module docstring. `stall_timeout_s` is what /health and the watchdog allow a step."""

    def __init__(self, phase: str = "loading", *, stall_timeout_s: float = 30.0) -> None:
        self.phase = "loading"
        self.set_phase(phase)
        self.started_monotonic = time.monotonic()
        self.stall_timeout_s = stall_timeout_s
        self.drain_retry_after_s = 5.0
        self.keyring = KeyRing(())
        self.quotas = QuotaBook(())
        self.admission = AdmissionQueue(ServerConfig.max_queued_requests, ServerConfig.max_queued_tokens)
        self.engine: AsyncEngine | None = None
        self._inflight: dict[str, InflightRequest] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    # ----- configuration ------------------------------------------------------------------

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.phase = phase

    def begin_drain(self) -> None:
        """New requests get 503 + Retry-After; those in flight carry on."""
        if self.phase in ("ready", "loading"):
            self.phase = "draining"

    def resume(self) -> None:
        if self.phase == "draining":
            self.phase = "ready"

    def set_clients(self, clients: tuple[ClientConfig, ...]) -> None:
        """Swap keys and quotas live. Raises ConfigError (keeping the old ones) on a bad key file."""
        keyring = KeyRing(clients)  # built first: a failure leaves everything as it was
        self.keyring = keyring
        self.quotas.set_clients(clients)

    def set_server_limits(self, server: ServerConfig) -> None:
        self.admission.max_requests = server.max_queued_requests
        self.admission.max_tokens = server.max_queued_tokens
        self.drain_retry_after_s = max(1.0, min(server.drain_timeout_s, 30.0))

    def attach_engine(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # ----- requests -----------------------------------------------------------------------

    @asynccontextmanager
    async def admit(
        self, *, request_id: str, client: str, route: str, prompt_tokens: int, reserved_tokens: int,
        engine_request_ids: list[str],
    ) -> AsyncIterator[Admission]:
        if self.phase != "ready":
            raise ServiceUnavailableError(
                f"the service is {self.phase}; retry later",
                retry_after_s=self.drain_retry_after_s if self.phase == "draining" else 5.0,
                code=f"service_{self.phase}",
            )
        now = time.monotonic()
        ticket = self.quotas.admit(client, reserved_tokens, now)
        try:
            self.admission.enter(prompt_tokens)
        except BaseException:
            self.quotas.settle(ticket, 0)
            raise
        entry = InflightRequest(request_id, client, route, prompt_tokens, engine_request_ids)
        admission = Admission(self, entry, ticket)
        self._inflight[request_id] = entry
        self._idle.clear()
        try:
            yield admission
        finally:
            if entry.queued:
                self.admission.leave(prompt_tokens)
                entry.queued = False
            self.quotas.settle(ticket, entry.prompt_tokens + entry.completion_tokens)
            del self._inflight[request_id]
            if not self._inflight:
                self._idle.set()

    def requests(self) -> list[dict]:
        """In-flight requests for the control socket. NOTE: never any prompt or output text."""
        now = time.monotonic()
        engine_phase: dict[str, str] = {}
        if self.engine is not None:
            engine_phase = {r.request_id: r.phase for r in self.engine.stats().requests}
        out = []
        for entry in self._inflight.values():
            phases = [engine_phase[rid] for rid in entry.engine_request_ids if rid in engine_phase]
            phase = phases[0] if phases else ("queued" if entry.queued else "finishing")
            out.append({
                "id": entry.request_id,
                "client": entry.client,
                "route": entry.route,
                "phase": phase,
                "prompt_tokens": entry.prompt_tokens,
                "completion_tokens": entry.completion_tokens,
                "age_s": round(now - entry.started_monotonic, 3),
            })
        return out

    async def cancel(self, request_id: str) -> bool:
        """Abort a request in flight; its stream ends with finish_reason "abort"."""
        entry = self._inflight.get(request_id)
        if entry is None or self.engine is None:
            return False
        for engine_request_id in entry.engine_request_ids:
            await self.engine.abort(engine_request_id)
        return True

    @property
    def inflight_count(self) -> int:
        return len(self._inflight)

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return not self._inflight
        return True
