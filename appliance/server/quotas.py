"""Per-client quotas and the bounded admission queue: the two ways a request gets 429 at once.

Per client (from `ClientConfig`, 0 = unlimited):
- requests/min: a sliding 60 s window; the N+1th request inside the window is refused.
- tokens/min: a sliding 60 s window of tokens. At admission a request reserves its prompt tokens
  plus its largest possible output (max_tokens × n); when it ends the reservation is replaced by
  what it really used. A request is refused when the window's tokens plus its reservation would
  exceed the limit (the way OpenAI counts max_tokens against a TPM limit).
- concurrent: requests in flight for that client.

Admission queue (from `ServerConfig`): a request counts as queued from admission until its first
token arrives (it is waiting for, or inside, its prefill). Beyond `max_queued_requests` requests
or `max_queued_tokens` prompt tokens queued, new requests are refused instead of waiting forever.

NOTE: everything here runs on the event loop: no locks; callers pass `now` (time.monotonic()).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from appliance.config import ClientConfig
from appliance.errors import EngineOverloadedError

WINDOW_S = 60.0


class RateLimitedError(EngineOverloadedError):
    """429 with a Retry-After (seconds) telling the client when a retry can succeed."""

    def __init__(self, message: str, *, retry_after_s: float, code: str) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class _Entry:
    __slots__ = ("time", "amount", "live")

    def __init__(self, time_s: float, amount: float) -> None:
        self.time = time_s
        self.amount = amount
        self.live = True


class _Window:
    """Amounts stamped with the time they were spent, summed over the last WINDOW_S seconds."""

    def __init__(self) -> None:
        self._entries: deque[_Entry] = deque()
        self.total = 0.0

    def expire(self, now: float) -> None:
        while self._entries and self._entries[0].time <= now - WINDOW_S:
            entry = self._entries.popleft()
            entry.live = False
            self.total -= entry.amount

    def add(self, now: float, amount: float) -> _Entry:
        entry = _Entry(now, amount)
        self._entries.append(entry)
        self.total += amount
        return entry

    def correct(self, entry: _Entry, amount: float) -> None:
        """Replace an entry's amount (a reservation settled); no-op once it has expired."""
        if entry.live:
            self.total += amount - entry.amount
            entry.amount = amount

    def seconds_until_below(self, now: float, limit: float, needed: float) -> float:
        """How long until `needed` more fits under `limit`, as old entries expire."""
        total = self.total
        for entry in self._entries:
            total -= entry.amount
            if total + needed <= limit:
                return max(entry.time + WINDOW_S - now, 0.0)
        return WINDOW_S


@dataclass
class ClientUsage:
    """Live counters for one client (also exported as Prometheus counters by metrics.py)."""

    config: ClientConfig
    requests: _Window = field(default_factory=_Window)
    tokens: _Window = field(default_factory=_Window)
    concurrent: int = 0


@dataclass
class QuotaTicket:
    client: str
    token_entry: _Entry | None
    usage: ClientUsage | None


class QuotaBook:
    """Checks and books per-client usage. `set_clients` swaps limits live, keeping usage."""

    def __init__(self, clients: tuple[ClientConfig, ...] = ()) -> None:
        self._usage: dict[str, ClientUsage] = {}
        self.set_clients(clients)

    def set_clients(self, clients: tuple[ClientConfig, ...]) -> None:
        old = self._usage
        self._usage = {}
        for client in clients:
            usage = old.get(client.name)
            if usage is None:
                usage = ClientUsage(client)
            else:
                usage.config = client
            self._usage[client.name] = usage

    def admit(self, client: str, reserved_tokens: int, now: float) -> QuotaTicket:
        usage = self._usage.get(client)
        if usage is None:  # no quotas for this client (no keys configured: "anonymous")
            return QuotaTicket(client, None, None)
        cfg = usage.config
        usage.requests.expire(now)
        usage.tokens.expire(now)
        if cfg.max_concurrent_requests and usage.concurrent >= cfg.max_concurrent_requests:
            raise RateLimitedError(
                f"client '{client}' already has {usage.concurrent} requests in flight "
                f"(limit {cfg.max_concurrent_requests})",
                retry_after_s=1.0, code="concurrency_limit_exceeded",
            )
        if cfg.requests_per_minute and usage.requests.total + 1 > cfg.requests_per_minute:
            wait_s = usage.requests.seconds_until_below(now, cfg.requests_per_minute, 1)
            raise RateLimitedError(
                f"client '{client}' reached its limit of {cfg.requests_per_minute} requests per minute",
                retry_after_s=wait_s, code="rate_limit_exceeded",
            )
        if cfg.tokens_per_minute and usage.tokens.total + reserved_tokens > cfg.tokens_per_minute:
            wait_s = usage.tokens.seconds_until_below(now, cfg.tokens_per_minute, reserved_tokens)
            raise RateLimitedError(
                f"client '{client}' reached its limit of {cfg.tokens_per_minute} tokens per minute "
                f"(this request reserves {reserved_tokens}: prompt + max_tokens × n)",
                retry_after_s=wait_s, code="tokens_limit_exceeded",
            )
        usage.requests.add(now, 1)
        entry = usage.tokens.add(now, reserved_tokens) if cfg.tokens_per_minute else None
        usage.concurrent += 1
        return QuotaTicket(client, entry, usage)

    def settle(self, ticket: QuotaTicket, used_tokens: int) -> None:
        if ticket.usage is None:
            return
        ticket.usage.concurrent -= 1
        if ticket.token_entry is not None:
            ticket.usage.tokens.correct(ticket.token_entry, used_tokens)


class AdmissionQueue:
    """Requests admitted but without a first token yet, bounded by count and prompt tokens."""

    def __init__(self, max_requests: int, max_tokens: int) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.num_requests = 0
        self.num_tokens = 0

    def enter(self, prompt_tokens: int) -> None:
        if self.num_requests + 1 > self.max_requests:
            raise RateLimitedError(
                f"the server is overloaded: {self.num_requests} requests are already queued",
                retry_after_s=1.0, code="queue_full",
            )
        if self.num_tokens + prompt_tokens > self.max_tokens:
            raise RateLimitedError(
                f"the server is overloaded: {self.num_tokens} prompt tokens are already queued",
                retry_after_s=1.0, code="queue_full",
            )
        self.num_requests += 1
        self.num_tokens += prompt_tokens

    def leave(self, prompt_tokens: int) -> None:
        self.num_requests -= 1
        self.num_tokens -= prompt_tokens


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds; never 0, so clients do wait."""
    return str(max(1, math.ceil(seconds)))
