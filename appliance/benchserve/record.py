"""What one request left behind: when it was due, sent, and when each token-carrying chunk arrived.

Every latency figure is derived from these timestamps (all `time.perf_counter()` seconds), so the
arithmetic in metrics.py can be checked on synthetic records with known answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    index: int
    due_s: float  # when the arrival schedule released it (client-side queueing starts here)
    start_s: float = 0.0  # when it was sent (after any concurrency limit)
    # One timestamp per streamed chunk that carried output (a chunk may carry several tokens).
    token_times_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    output_tokens_source: str = ""  # "usage" (the server's count), "tokenizer" or "chunks"
    prompt_tokens: int = 0  # the server's usage.prompt_tokens, else the client's own count
    finish_reason: str | None = None
    error_kind: str | None = None  # None: succeeded
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0] - self.start_s

    @property
    def e2e_s(self) -> float:
        """Sent to last token (the trailing usage chunk and [DONE] carry no token)."""
        return self.token_times_s[-1] - self.start_s

    @property
    def itls_s(self) -> list[float]:
        """Every gap between consecutive token-carrying chunks."""
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); None for a single-token answer."""
        if self.output_tokens <= 1:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def client_queue_s(self) -> float:
        return self.start_s - self.due_s
