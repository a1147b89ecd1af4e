"""The daemon's logging: stderr (the journal under systemd) and reopening log files on SIGUSR1.

Files (the request log) are `logging.FileHandler`s on any logger; logrotate moves them away and
sends SIGUSR1 (see logrotate/llm-appliance), and `reopen_log_files` makes each handler open a
fresh file at its path.
"""

from __future__ import annotations

import logging
import os
import sys

_STDERR_HANDLER_NAME = "appliance-stderr"


def setup_logging(level: str) -> None:
    """Idempotent: one stderr handler on the root logger, at `level`."""
    root = logging.getLogger()
    root.setLevel(level)
    if any(h.get_name() == _STDERR_HANDLER_NAME for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_STDERR_HANDLER_NAME)
    if os.environ.get("JOURNAL_STREAM"):
        # The journal stamps time and unit itself; a syslog-style prefix sets the priority.
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    # Libraries chatter at INFO; the daemon's own loggers are "appliance.*".
    for noisy in ("aiohttp.access", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class _JournalFormatter(logging.Formatter):
    """Prefixes `<N>` (sd-daemon(3)) so journald records each line's priority."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        priority = self._PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def _all_handlers() -> list[logging.Handler]:
    handlers = list(logging.getLogger().handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            handlers.extend(logger.handlers)
    return handlers


def reopen_log_files() -> int:
    """Close and reopen every FileHandler at its path (after logrotate moved the file away).
    Returns how many were reopened."""
    count = 0
    for handler in _all_handlers():
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = handler._open()
            finally:
                handler.release()
            count += 1
    return count
