"""What every key does, and what the panels mean."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

PANELS = (
    ("Daemon", "phase (ready / draining / loading / stopping), model, uptime, version, config file"),
    ("Throughput", "generated and prompt tokens/s, requests finished/s over 10 s; sparklines: 5 min"),
    ("Latency", "time to first token (TTFT) and inter-token latency (ITL), p50/p99 over 1 min"),
    ("KV cache", "blocks held by running requests, prefix-cache hit rate, preemptions"),
    ("Queue", "running and waiting in the engine, queued for a first token, 429 refusals"),
    ("Clients", "per API key: requests, 429s, tokens; last minute against its quotas (used/limit)"),
    ("Requests", "in flight: never any prompt or output text"),
    ("GPU", "NVML, once a second: N/A where the GPU does not report a field"),
)


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 90%; max-width: 100; height: 90%;
        border: thick $primary; background: $surface; padding: 0 1;
    }
    """
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "Close")]

    def __init__(self, bindings: list[tuple[str, str]]) -> None:
        super().__init__()
        self.key_help = bindings

    def compose(self) -> ComposeResult:
        keys = Table.grid(padding=(0, 2))
        keys.add_column(style="bold")
        keys.add_column()
        for key, description in self.key_help:
            keys.add_row(key, description)
        panels = Table.grid(padding=(0, 2))
        panels.add_column(style="bold")
        panels.add_column()
        for name, description in PANELS:
            panels.add_row(name, description)
        with VerticalScroll():
            yield Static(Text("llm-appliance dashboard — keys", style="bold underline"))
            yield Static(keys)
            yield Static(Text("\nPanels", style="bold underline"))
            yield Static(panels)
            yield Static(Text("\nEsc closes this help.", style="dim"))
