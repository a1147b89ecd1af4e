"""Latency: time to first token and inter-token latency, p50 and p99 over the last minute."""

from __future__ import annotations

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from appliance.dashboard import format as fmt
from appliance.dashboard.widgets.panel import DASH, StatusPanel
from appliance.status import StatusSnapshot


class LatencyPanel(StatusPanel):
    TITLE = "Latency 1m"

    def render_status(self, status: StatusSnapshot | None) -> RenderableType:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim")
        grid.add_column(justify="right")
        grid.add_column(justify="right")
        grid.add_row("", Text("p50", style="dim"), Text("p99", style="dim"))
        if status is None:
            grid.add_row("TTFT", DASH, DASH)
            grid.add_row("ITL", DASH, DASH)
            return grid
        lat = status.latency
        compact = self.inner_width < 24  # an 80-column terminal: 625ms, not 625.0 ms
        s = lambda value: fmt.seconds(value, compact=compact)  # noqa: E731
        grid.add_row("TTFT", Text(s(lat.ttft_p50_s), style="bold"), s(lat.ttft_p99_s))
        grid.add_row("ITL", Text(s(lat.inter_token_p50_s), style="bold"), s(lat.inter_token_p99_s))
        grid.add_row("reqs", fmt.count(lat.num_requests), "")
        return grid
