"""API keys: named clients, keys compared in constant time.

With no client configured the server is open and every request belongs to "anonymous". With
clients, every route except /health (and /metrics unless `metrics_require_auth`) needs
`Authorization: Bearer <key>`. Keys come from `ClientConfig.api_key` or, when that is empty,
from `api_key_file` (e.g. a systemd credential), read when the key ring is built (start, SIGHUP).
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from appliance.config import ClientConfig
from appliance.errors import ApplianceError, ConfigError

ANONYMOUS = "anonymous"


class AuthenticationError(ApplianceError):
    """401: a key is required and the one given (if any) is not known."""

    http_status = 401
    error_type = "invalid_request_error"


def _digest(key: str) -> bytes:
    # Comparing fixed-size digests keeps the comparison time independent of the key lengths too.
    return hashlib.sha256(key.encode()).digest()


def read_client_key(client: ClientConfig) -> str:
    if client.api_key:
        return client.api_key
    if client.api_key_file:
        try:
            key = Path(client.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"clients.{client.name}.api_key_file: cannot read {client.api_key_file!r}: {exc.strerror}"
            ) from exc
        if key:
            return key
    raise ConfigError(f"clients.{client.name}: needs a non-empty api_key or api_key_file")


class KeyRing:
    """Maps a presented key to its client's name. Immutable: reloads build a new one."""

    def __init__(self, clients: tuple[ClientConfig, ...] = ()) -> None:
        self._digests: list[tuple[bytes, str]] = [(_digest(read_client_key(c)), c.name) for c in clients]

    @property
    def open(self) -> bool:
        """True when no key is configured: every request is let in as "anonymous"."""
        return not self._digests

    def identify(self, authorization: str | None) -> str:
        """The client name for an `Authorization` header value; raises AuthenticationError."""
        if self.open:
            return ANONYMOUS
        if not authorization:
            raise AuthenticationError(
                "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
            )
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError(
                "malformed Authorization header: expected 'Bearer <key>'", code="invalid_api_key"
            )
        presented = _digest(key.strip())
        found: str | None = None
        # NOTE: compare against every key, without stopping at a match, so the time taken says
        # nothing about which key (or how much of one) matched.
        for digest, name in self._digests:
            if hmac.compare_digest(presented, digest) and found is None:
                found = name
        if found is None:
            raise AuthenticationError("invalid API key", code="invalid_api_key")
        return found
