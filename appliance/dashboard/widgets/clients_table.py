"""Clients: requests, 429s, tokens, in flight, and the last minute's use against each quota."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import DataTable

from appliance.dashboard import format as fmt
from appliance.dashboard.widgets.panel import ALARM
from appliance.status import ClientUsage, StatusSnapshot

COLUMNS = (("CLIENT", "name"), ("REQS", "requests"), ("429", "rejected"), ("TOKENS", "tokens"),
           ("LIVE", "live"), ("REQ/MIN", "rpm"), ("TOK/MIN", "tpm"))


def quota(used: int, limit: int) -> Text:
    """`used/limit` (bold past 90% of the limit), or just `used` when unlimited."""
    if not limit:
        return Text(fmt.count(used), justify="right")
    style = ALARM if used >= 0.9 * limit else ""
    return Text(f"{fmt.count(used)}/{fmt.count(limit)}", style=style, justify="right")


def _cells(c: ClientUsage) -> tuple[str | Text, ...]:
    right = lambda s: Text(s, justify="right")  # noqa: E731
    return (c.name, right(fmt.count(c.requests_total)), right(fmt.count(c.rejected_total)),
            right(fmt.count(c.prompt_tokens_total + c.generation_tokens_total)),
            quota(c.in_flight, c.max_concurrent_requests),
            quota(c.requests_last_minute, c.requests_per_minute_limit),
            quota(c.tokens_last_minute, c.tokens_per_minute_limit))


class ClientsTable(DataTable[str | Text]):
    DEFAULT_CSS = """
    ClientsTable {
        border: round $primary-darken-1;
        border-title-style: bold;
        height: 1fr;
    }
    """

    status: reactive[StatusSnapshot | None] = reactive(None)

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="none", show_cursor=False, **kwargs)  # type: ignore[arg-type]

    def on_mount(self) -> None:
        self.border_title = "Clients"
        for label, key in COLUMNS:
            self.add_column(label, key=key)

    def watch_status(self, status: StatusSnapshot | None) -> None:
        clients = status.clients if status is not None else []
        if [key.value for key in self.rows] != [c.name for c in clients]:
            self.clear()
            for c in clients:
                self.add_row(*_cells(c), key=c.name)
            return
        for c in clients:
            for (_, column), value in zip(COLUMNS, _cells(c), strict=True):
                self.update_cell(c.name, column, value, update_width=True)
