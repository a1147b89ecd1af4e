"""Throughput: generated and prompt tokens/s and requests/s, with sparklines over five minutes."""

from __future__ import annotations

from collections import deque

from rich.console import Group, RenderableType
from rich.text import Text

from appliance.dashboard import format as fmt
from appliance.dashboard.widgets.panel import DASH, StatusPanel, row, sparkline
from appliance.status import RateHistory, StatusSnapshot

HISTORY_S = 300  # sparkline span: one value per `stats` event (a second)


class ThroughputPanel(StatusPanel):
    TITLE = "Throughput"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.generation_history: deque[float] = deque(maxlen=HISTORY_S)
        self.prompt_history: deque[float] = deque(maxlen=HISTORY_S)
        self.requests_history: deque[float] = deque(maxlen=HISTORY_S)

    def seed(self, history: RateHistory) -> None:
        """Start the sparklines from the daemon's own history (a dashboard that just connected)."""
        for deq, values in ((self.generation_history, history.generation_tokens_per_s),
                            (self.prompt_history, history.prompt_tokens_per_s),
                            (self.requests_history, history.requests_per_s)):
            deq.clear()
            deq.extend(values)
        self.update(self.render_status(self.status))

    def watch_status(self, status: StatusSnapshot | None) -> None:
        if status is not None:
            t = status.throughput
            self.generation_history.append(t.generation_tokens_per_s)
            self.prompt_history.append(t.prompt_tokens_per_s)
            self.requests_history.append(t.requests_per_s)
        super().watch_status(status)

    def render_status(self, status: StatusSnapshot | None) -> RenderableType:
        w = self.inner_width
        if status is None:
            return Group(row("gen", DASH, 7), Text(), row("prompt", DASH, 7), Text(), row("req/s", DASH, 7))

        t = status.throughput
        spark = lambda values: sparkline(list(values), w, span_s=HISTORY_S)  # noqa: E731
        gen = row("gen", Text(fmt.rate(t.generation_tokens_per_s, "tok/s"), style="bold"), 7)
        prompt = row("prompt", fmt.rate(t.prompt_tokens_per_s, "tok/s"), 7)
        requests = row("req/s", fmt.rate(t.requests_per_s), 7)
        if self.content_region.height < 6:  # an 80x24 terminal: the two token rates drawn
            return Group(gen, spark(self.generation_history), prompt, spark(self.prompt_history))
        return Group(gen, spark(self.generation_history), prompt, spark(self.prompt_history),
                     requests, spark(self.requests_history))
