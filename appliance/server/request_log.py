"""One JSON line per API request: who, what route, status, token counts, timings, finish reason.

NOTE: prompts and outputs are private. They are written only when the operator sets
`logging.log_request_text = true`; otherwise no field here ever holds request text (error
messages are left out too, since validation messages can quote the request).

Lines go to `logging.request_log_path` when set (opened in append mode, `reopen()` after
logrotate moves it: the daemon calls it on SIGUSR1), else to the `appliance.requests` logger.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import IO, Any

from appliance.config import LoggingConfig

logger = logging.getLogger("appliance.requests")


@dataclass
class RequestRecord:
    """Filled in by the middleware and the route as the request goes; written when it ends."""

    request_id: str
    route: str
    method: str
    started: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    client: str | None = None
    completion_id: str | None = None
    status: int = 0
    error_type: str | None = None
    error_code: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    stream: bool | None = None
    # Private text: only written when log_request_text is on.
    prompt_text: Any = None
    output_text: list[str] | None = None


class RequestLog:
    def __init__(self, config: LoggingConfig) -> None:
        self.path = config.request_log_path
        self.log_text = config.log_request_text
        self._file: IO[str] | None = None
        self.reopen()

    def reopen(self) -> None:
        """Close and reopen the file (after rotation)."""
        self.close()
        if self.path:
            self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, record: RequestRecord) -> None:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.started))
            + f".{int(record.started * 1000) % 1000:03d}Z",
            "request_id": record.request_id,
            "id": record.completion_id,
            "client": record.client,
            "method": record.method,
            "route": record.route,
            "status": record.status,
            "stream": record.stream,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "ttft_s": None if record.ttft_s is None else round(record.ttft_s, 4),
            "total_s": round(time.monotonic() - record.started_monotonic, 4),
            "finish_reason": record.finish_reasons[0] if len(record.finish_reasons) == 1 else (
                record.finish_reasons or None),
        }
        if record.error_type is not None:
            line["error_type"] = record.error_type
            line["error_code"] = record.error_code
        if self.log_text:
            line["prompt"] = record.prompt_text
            line["output"] = record.output_text
        text = json.dumps(line, ensure_ascii=False)
        if self._file is not None:
            self._file.write(text + "\n")
        else:
            logger.info(text)
