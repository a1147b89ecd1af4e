"""The daemon at a glance (two lines, no border): phase, model, uptime, version, pid; HTTP
address, log level, config path. The phase is a word, not only a colour (NO_COLOR)."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text

from appliance.dashboard import format as fmt
from appliance.dashboard.widgets.panel import ALARM, StatusPanel
from appliance.status import StatusSnapshot

PHASE_STYLES = {"ready": "bold green", "draining": "bold yellow", "loading": "bold cyan",
                "stopping": "bold red"}


class DaemonBar(StatusPanel):
    DEFAULT_CSS = """
    DaemonBar {
        border: none;
        height: 2;
        padding: 0 1;
        background: $boost;
    }
    """

    def __init__(self, socket_path: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.socket_path = socket_path

    def render_status(self, status: StatusSnapshot | None) -> RenderableType:
        if status is None:
            return Group(Text.assemble(("● DISCONNECTED", ALARM), ("  llm-appliance", "dim")),
                         Text.assemble(("socket ", "dim"), self.socket_path))
        phase = status.phase.upper()
        engine = status.engine
        health = ""
        if engine is not None and engine.dead:
            health = "  ENGINE DEAD"
        elif engine is not None and not engine.progressing:
            health = "  ENGINE STALLED"
        line1 = Text.assemble(
            (f"● {phase}", PHASE_STYLES.get(status.phase, "bold")), (health, ALARM if health else ""),
            "  ", (status.model or "(loading)", "bold"),
            ("  up ", "dim"), fmt.duration(status.uptime_s),
            ("  in flight ", "dim"), str(status.inflight),
            ("  v", "dim"), status.version, ("  pid ", "dim"), str(status.pid),
        )
        line2 = Text.assemble(
            ("http ", "dim"), status.http_address or "—",
            ("  log ", "dim"), status.log_level,
            ("  config ", "dim"), status.config_path or "(built-in defaults)",
            ("  socket ", "dim"), self.socket_path,
        )
        for line in (line1, line2):
            line.no_wrap = True
            line.overflow = "ellipsis"
        return Group(line1, line2)
