"""Requests in flight: id, client, phase, prompt/output tokens, age, tokens/s. Never any text.
Rows are keyed by request id, so the selection stays on its request while the table refreshes."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import DataTable

from appliance.dashboard import format as fmt
from appliance.status import RequestRow

COLUMNS = (("ID", "id"), ("CLIENT", "client"), ("PHASE", "phase"), ("PROMPT", "prompt"),
           ("OUTPUT", "output"), ("AGE", "age"), ("TOK/S", "rate"))


def short_id(request_id: str, width: int) -> str:
    return request_id if len(request_id) <= width else request_id[:width - 1] + "…"


def _cells(r: RequestRow, id_width: int) -> tuple[str | Text, ...]:
    right = lambda s: Text(s, justify="right")  # noqa: E731
    return (short_id(r.id, id_width), r.client, r.phase, right(fmt.count(r.prompt_tokens)), right(fmt.count(r.completion_tokens)),
            right(fmt.duration(r.age_s)), right(fmt.rate(r.tokens_per_s)))


class RequestsTable(DataTable[str | Text]):
    DEFAULT_CSS = """
    RequestsTable {
        border: round $primary-darken-1;
        border-title-style: bold;
        height: 1fr;
    }
    """

    requests: reactive[list[RequestRow] | None] = reactive(None)

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)  # type: ignore[arg-type]

    def on_mount(self) -> None:
        self.border_title = "Requests"
        for label, key in COLUMNS:
            self.add_column(label, key=key)

    def watch_requests(self, requests: list[RequestRow] | None) -> None:
        rows = requests or []
        self.border_title = f"Requests ({len(rows)})" if requests is not None else "Requests"
        wanted = {r.id: r for r in rows}
        for key in [k for k in self.request_ids() if k not in wanted]:
            self.remove_row(key)
        existing = set(self.request_ids())
        # Narrow terminals see the start of each id (c cancels by the full id, the row's key).
        # The other columns and the cell padding take ~50 cells; ids are 41 ("chatcmpl-" + 32 hex).
        id_width = min(max(self.size.width - 50, 13), 41)
        for r in rows:
            cells = _cells(r, id_width)
            if r.id in existing:
                for (_, column), value in zip(COLUMNS, cells, strict=True):
                    self.update_cell(r.id, column, value, update_width=True)
            else:
                self.add_row(*cells, key=r.id)

    def on_resize(self) -> None:
        self.watch_requests(self.requests)  # ids as wide as the new width allows

    def request_ids(self) -> list[str]:
        return [key.value for key in self.rows if key.value is not None]

    @property
    def selected_request_id(self) -> str | None:
        if self.row_count == 0:
            return None
        row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return row_key.value
