"""OpenAI response bodies built from the engine's per-step deltas (streamed or whole).

`ChoiceTracker` maps a request's `RequestDelta`s (one engine request per prompt, n choices each)
to the response's choices: per-choice deltas (new text, new tokens, new logprobs, the finish
reason once) for both kinds of route, so streaming and non-streaming responses are built from
the same bookkeeping. NOTE: O(new tokens) per delta: text is kept as pieces, joined once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from appliance.engine.outputs import RequestDelta, TokenLogprob


class TokenTexts:
    """Token id → its text (as OpenAI's logprobs show it) and its UTF-8 bytes, cached.

    NOTE: a token may hold part of a character (byte-level BPE, SentencePiece byte fallback): its
    text then decodes to U+FFFD, but `bytes` are the token's own bytes, so a client joining the
    bytes of consecutive tokens gets the character back (OpenAI's `bytes` semantics).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.text = lru_cache(maxsize=1 << 16)(self._decode)
        self.bytes = lru_cache(maxsize=1 << 16)(self._bytes)
        self._byte_of: dict[str, int] | None = None

    def _decode(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def _bytes(self, token_id: int) -> tuple[int, ...]:
        text = self.text(token_id)
        if _REPLACEMENT not in text:
            return tuple(text.encode("utf-8"))
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
                return (int(piece[3:5], 16),)
            if self._byte_of is None:
                self._byte_of = _byte_level_alphabet()
            if piece and all(c in self._byte_of for c in piece):  # byte-level BPE
                return tuple(self._byte_of[c] for c in piece)
        return tuple(text.encode("utf-8"))


_REPLACEMENT = "\ufffd"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


@dataclass
class ChoiceDelta:
    index: int  # the choice's index in the response (prompt index × n + output index)
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    first: bool  # the first delta of this choice (chat: carries the role)


@dataclass
class _ChoiceState:
    num_tokens: int = 0
    started: bool = False
    finish_reason: str | None = None
    texts: list[str] = field(default_factory=list)  # the pieces, joined by `text`
    logprobs: list[TokenLogprob] = field(default_factory=list)
    keep_text: bool = True

    @property
    def text(self) -> str:
        if len(self.texts) > 1:
            self.texts[:] = ["".join(self.texts)]
        return self.texts[0] if self.texts else ""


class ChoiceTracker:
    """Per-choice progress of one HTTP request (possibly several prompts × n choices).

    keep_text=False (streams that log no text): nothing is kept but counts and finish reasons.
    """

    def __init__(self, num_prompts: int, n: int, prompt_lens: list[int], *, keep_text: bool = True) -> None:
        self.n = n
        self.prompt_lens = prompt_lens
        self.choices = [_ChoiceState(keep_text=keep_text) for _ in range(num_prompts * n)]
        self.first_token_monotonic: float | None = None
        self.last_token_monotonic: float | None = None
        self.finished_metrics: list[Any] = []
        self._completion_tokens = 0
        self.prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}  # [apps] prompt index -> entries

    def update(self, prompt_index: int, output: RequestDelta) -> list[ChoiceDelta]:
        deltas = []
        if output.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = output.prompt_logprobs
        for out in output.outputs:
            index = prompt_index * self.n + out.index
            state = self.choices[index]
            if state.finish_reason is not None:
                continue
            text = _cut_text(out.text, out.finish_reason)
            new_logprobs = out.logprobs or []
            state.num_tokens += len(out.token_ids)
            self._completion_tokens += len(out.token_ids)
            if state.keep_text:
                if text:
                    state.texts.append(text)
                if new_logprobs:
                    state.logprobs += new_logprobs
            # NOTE: a step whose token has no text yet (a partial character, a held-back stop
            # prefix) is still a delta: streams send one event per engine step, as vLLM does.
            if not (text or out.token_ids or out.finish_reason or not state.started):
                continue
            deltas.append(ChoiceDelta(index, text, out.token_ids, new_logprobs, out.finish_reason,
                                      not state.started))
            state.started = True
            state.finish_reason = out.finish_reason
        if output.finished and output.metrics is not None:
            self.finished_metrics.append(output.metrics)
        return deltas

    @property
    def completion_tokens(self) -> int:
        return self._completion_tokens

    @property
    def finish_reasons(self) -> list[str]:
        return [c.finish_reason for c in self.choices if c.finish_reason is not None]

    def usage(self) -> dict[str, int]:
        prompt = sum(self.prompt_lens)
        completion = self.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _cut_text(text: str, finish_reason: str | None) -> str:
    """The final text of a choice cut inside a character (length, abort) ends before it, never in
    U+FFFD (the detokenizer flushes an incomplete character as one)."""
    return text.rstrip(_REPLACEMENT) if finish_reason in ("length", "abort") else text


def now_s() -> int:
    return int(time.time())


# ----- logprobs -------------------------------------------------------------------------------


def _token_entry(texts: TokenTexts, token_id: int, logprob: float) -> dict[str, Any]:
    return {"token": texts.text(token_id), "logprob": logprob, "bytes": list(texts.bytes(token_id))}


def chat_logprobs(texts: TokenTexts, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    content = []
    for lp in logprobs:
        entry = _token_entry(texts, lp.token_id, lp.logprob)
        entry["top_logprobs"] = [_token_entry(texts, tid, value) for tid, value in lp.top]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(
    texts: TokenTexts, logprobs: list[TokenLogprob], *, text_offset_start: int,
    echo_prompt_ids: list[int] | None = None, prompt_logprobs: list[TokenLogprob | None] | None = None,
) -> dict[str, Any]:
    """Legacy completions logprobs. Echoed prompt tokens carry their prompt logprobs when the engine
    computed them (the first token has none: None), else None."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = text_offset_start
    for i, tid in enumerate(echo_prompt_ids or []):
        text = texts.text(tid)
        tokens.append(text)
        entry = prompt_logprobs[i] if prompt_logprobs is not None and i < len(prompt_logprobs) else None
        token_logprobs.append(None if entry is None else entry.logprob)
        top_logprobs.append(None if entry is None else {texts.text(t): v for t, v in entry.top})
        offsets.append(offset)
        offset += len(text)
    for lp in logprobs:
        text = texts.text(lp.token_id)
        tokens.append(text)
        token_logprobs.append(lp.logprob)
        top_logprobs.append({texts.text(tid): value for tid, value in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}
