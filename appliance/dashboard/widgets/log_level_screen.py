"""Pick the daemon's log level (not persisted: the config's level returns on restart)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from appliance.config import LOG_LEVELS


class LogLevelScreen(ModalScreen[str | None]):
    DEFAULT_CSS = """
    LogLevelScreen { align: center middle; }
    LogLevelScreen > Vertical {
        width: 44; height: auto; border: thick $primary; background: $surface; padding: 1 2;
    }
    LogLevelScreen OptionList { height: auto; margin-top: 1; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, current: str | None) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Daemon log level (now {self.current or 'unknown'}):")
            yield OptionList(*(Option(level, id=level) for level in LOG_LEVELS))

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        if self.current in LOG_LEVELS:
            options.highlighted = LOG_LEVELS.index(self.current)
        options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)
