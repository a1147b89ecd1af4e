"""Queue: running and waiting in the engine, awaiting a first token, and 429 rejections."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text

from appliance.dashboard import format as fmt
from appliance.dashboard.widgets.panel import ALARM, DASH, StatusPanel, row
from appliance.status import StatusSnapshot


class QueuePanel(StatusPanel):
    TITLE = "Queue"

    def render_status(self, status: StatusSnapshot | None) -> RenderableType:
        labels = ("running", "waiting", "queued", "429/1m")
        if status is None or status.engine is None:
            return Group(*(row(label, DASH, 8) for label in labels))
        q = status.queue
        rejected_style = ALARM if q.rejected_last_minute else ""
        lines = [
            row("running", Text(fmt.count(q.running), style="bold"), 8),
            row("waiting", fmt.count(q.waiting), 8),
            row("queued", fmt.count(q.admission_queued), 8),
            row("429/1m", Text(fmt.count(q.rejected_last_minute), style=rejected_style), 8),
        ]
        if self.content_region.height >= 5:
            lines.append(row("429s", fmt.count(q.rejected_total), 8))
        return Group(*lines)
