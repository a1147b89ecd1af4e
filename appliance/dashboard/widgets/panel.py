"""`StatusPanel`: a bordered panel that redraws from the daemon's latest `StatusSnapshot`."""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from appliance.status import StatusSnapshot

DASH = "—"  # no daemon data (disconnected, or the engine is still loading)
# A figure that needs the operator: white on red, so it still stands out under NO_COLOR (where
# Textual turns colours to greys and red text alone would fade).
ALARM = "bold white on red"
WARN = "bold yellow"


def bar(fraction: float | None, width: int) -> Text:
    """A usage bar drawn with characters (█ used, ░ free), so it reads without colour."""
    if fraction is None:
        return Text("░" * width, style="dim")
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    style = "red" if fraction >= 0.9 else "yellow" if fraction >= 0.7 else "green"
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))


def row(label: str, value: str | Text, label_width: int) -> Text:
    """`label   value`, the label dim: one line of a panel."""
    return Text.assemble((f"{label:<{label_width - 1}} ", "dim"), value)


class StatusPanel(Static):
    """Subclasses implement `render_status`; `status` is bound to the app's (None: no data)."""

    DEFAULT_CSS = """
    StatusPanel {
        border: round $primary-darken-1;
        border-title-color: $text;
        border-title-style: bold;
        padding: 0 1;
        height: 100%;
    }
    """
    TITLE = ""

    status: reactive[StatusSnapshot | None] = reactive(None)

    def on_mount(self) -> None:
        self.border_title = self.TITLE
        self.update(self.render_status(self.status))

    def watch_status(self, status: StatusSnapshot | None) -> None:
        self.update(self.render_status(status))

    def on_resize(self) -> None:
        self.update(self.render_status(self.status))  # bars and sparklines follow the width

    @property
    def inner_width(self) -> int:
        return max(self.content_region.width, 8)

    def render_status(self, status: StatusSnapshot | None) -> RenderableType:
        raise NotImplementedError


_TICKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int, seconds_per_value: float = 1.0,
              span_s: float = 300.0) -> Text:
    """The last `span_s` seconds of `values` (one per `seconds_per_value`) in `width` cells, each
    cell the mean of its share; scaled to the largest cell, so a flat line at zero stays ▁."""
    if width <= 0:
        return Text()
    per_cell = max(1, round(span_s / seconds_per_value / width))
    recent = values[-per_cell * width:]
    cells = [recent[i:i + per_cell] for i in range(0, len(recent), per_cell)]
    means = [sum(c) / len(c) for c in cells if c]
    top = max(means, default=0.0)
    ticks = "".join(_TICKS[min(int(m / top * (len(_TICKS) - 1) + 0.5), len(_TICKS) - 1)] if top > 0 else _TICKS[0]
                    for m in means)
    return Text.assemble((" " * (width - len(ticks)), "dim"), (ticks, "cyan"))
