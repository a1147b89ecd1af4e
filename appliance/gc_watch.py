"""Long pauses of Python's cyclic garbage collector, logged where they happen.

A full collection walks every tracked object made since the heap was frozen (both the engine
process and the daemon freeze theirs once loaded). After a long burst of requests that can be a
pause of hundreds of milliseconds in the middle of a step (engine) or of every stream's events
(daemon), and nothing else would say so. Collections of at least `threshold_s` are logged as a
WARNING with their generation and duration; shorter ones are only counted. Installed by the
engine's process (`core_process`) once warm and by the daemon once serving (an inline engine
shares the daemon's process and its watch), never by a library user of `EngineCore`/`LLM`.
`llm-appliance bench serve` counts its own client's pauses with the same class (log=False).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD_S = 0.05


class GcPauseWatch:
    def __init__(self, where: str, threshold_s: float = DEFAULT_THRESHOLD_S, *, log_long: bool = True) -> None:
        self.where = where
        self.threshold_s = threshold_s
        self.log_long = log_long
        self.collections = 0
        self.long_pauses = 0
        self.longest_s = 0.0
        self.total_s = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        self.collections += 1
        self.total_s += seconds
        self.longest_s = max(self.longest_s, seconds)
        if seconds >= self.threshold_s:
            self.long_pauses += 1
            if self.log_long:
                log.warning("%s: the garbage collector paused %.0f ms (generation %s, %s objects collected)",
                            self.where, seconds * 1e3, info.get("generation"), info.get("collected"))

    def install(self) -> GcPauseWatch:
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        return self

    def uninstall(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


_WATCH: GcPauseWatch | None = None


def watch_gc_pauses(where: str) -> GcPauseWatch:
    """The process's one watch, installed on the first call; `where` names the process's role in
    its log lines ("engine", "daemon"; "engine+daemon" when the engine runs inline)."""
    global _WATCH
    if _WATCH is None:
        _WATCH = GcPauseWatch(where).install()
    elif where not in _WATCH.where.split("+"):
        _WATCH.where += "+" + where
    return _WATCH


def long_pauses_so_far() -> int:
    """Long pauses seen by this process's watch since it was installed (0 without one)."""
    return _WATCH.long_pauses if _WATCH is not None else 0
