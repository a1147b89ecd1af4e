"""The connection banner: hidden while the control socket answers; otherwise why it does not
(no daemon, permission denied with the group to join, a broken stream) and when the next try is."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static


@dataclass(frozen=True)
class Connection:
    connected: bool
    message: str = ""  # why not, when not connected
    retry_in_s: float = 0.0
    attempt: int = 0  # failed tries in a row


CONNECTING = Connection(False, "connecting…")


class Banner(Static):
    DEFAULT_CSS = """
    Banner {
        height: auto;
        padding: 0 1;
        background: $error;
        color: $text;
        text-style: bold;
    }
    Banner.-hidden { display: none; }
    """

    connection: reactive[Connection] = reactive(CONNECTING)

    def watch_connection(self, connection: Connection) -> None:
        self.set_class(connection.connected, "-hidden")
        if connection.connected:
            return
        if connection.attempt == 0:
            self.update(Text(f"DAEMON: {connection.message}"))
            return
        # NOTE: no countdown or attempt count here: the banner stays still while it retries.
        self.update(Text(f"DAEMON UNREACHABLE: {connection.message} — retrying every few seconds"))
