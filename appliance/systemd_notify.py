"""The sd_notify protocol: datagrams of `KEY=value` lines to $NOTIFY_SOCKET (see sd_notify(3)).

Written on a raw socket rather than the sdnotify package because we need abstract-namespace
addresses ('@...'), errors we can see, and the watchdog variables. Without $NOTIFY_SOCKET (not
under systemd) every call is a no-op, so the daemon runs the same by hand.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        # NOTE: '@name' is a Linux abstract socket: its real address starts with a NUL byte.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram, e.g. notify(READY=1, STATUS="serving"). False when it did not go out."""
        if self._sock is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError as e:
            # A vanished manager must never take the daemon down; the watchdog will tell.
            log.warning("sd_notify %r failed: %s", message, e)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s() -> float | None:
    """How often to send WATCHDOG=1 (half of WatchdogSec=), or None when no watchdog is asked of
    this process (unset, or meant for another PID)."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None
