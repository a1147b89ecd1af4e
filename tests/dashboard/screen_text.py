"""The app's screen as plain text, the way a user reads it (no colour, no styles)."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from textual.app import App


def screen_text(app: App[Any]) -> str:
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system=None, record=True, legacy_windows=False, safe_box=False)
    # The compositor's full frame, as `App.export_screenshot` renders it, without the SVG.
    console.print(app.screen._compositor.render_update(full=True))
    return console.export_text()
