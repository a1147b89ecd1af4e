"""Incremental detokenization with stop strings, exact across token boundaries.

Tokens do not map to text one by one: a byte-level BPE token may hold half of a UTF-8 character
(emoji, CJK), and SentencePiece-style decoders drop the leading space of the first token they see.
So each step decodes a short window of recent tokens twice, with and without the new tokens
(`prefix_offset` .. `read_offset` .. end), and emits the difference; while that text ends with
U+FFFD (an incomplete character) nothing is emitted and the window grows until it completes. The
first window reaches back into the prompt so the first output token gets its leading space.

Stop strings: after each step the new text (plus an overlap of max stop length - 1 characters) is
searched for every stop string; the earliest match wins and the text is cut exactly before it (or
after it with include_stop_str_in_output). While streaming, a trailing piece of text that could
be the start of a stop string is held back, so a stop string is never partially emitted.

NOTE: `seq.output_text` only ever grows (streaming consumers send its new suffix as a delta).
"""

from __future__ import annotations

import codecs
import json
from typing import Any, NamedTuple

from appliance.engine.sequence import Sequence

# Prompt tokens the first window reaches back over (enough context for any leading-space rule).
_PROMPT_CONTEXT_TOKENS = 6
_REPLACEMENT_CHAR = "\ufffd"


class _DetokState(NamedTuple):
    """Replaced, never mutated: a sequence forked from another may share the object safely.
    (A NamedTuple: built for every token of every sequence, it must be cheap.)"""

    prefix_offset: int  # token_ids[prefix_offset:read_offset]: the context decoded last time
    read_offset: int  # token_ids[read_offset:]: not yet turned into text
    text: str  # every character decoded so far (held-back characters included)
    pending: bytes = b""  # byte-level fast path: an incomplete UTF-8 tail, not yet text


def _gpt2_byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): one printable character per byte value."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _byte_level_table(backend: Any) -> tuple[list[bytes], frozenset[int]] | None:
    """Token id -> its bytes, and the special ids, for a byte-level BPE tokenizer; else None.

    Mirrors the Rust ByteLevel decoder: a token's characters map to bytes, a token with a
    character outside the alphabet (an added token) contributes its UTF-8 text.
    """
    try:
        spec = json.loads(backend.to_str())
        added = backend.get_added_tokens_decoder()
    except Exception:  # an unusual backend: use the general path
        return None
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "ByteLevel" or (spec.get("model") or {}).get("type") != "BPE":
        return None
    byte_of = _gpt2_byte_decoder()
    vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values(), default=-1) + 1)
    for token, token_id in vocab.items():
        if token_id in added:
            table[token_id] = added[token_id].content.encode("utf-8")
        elif all(c in byte_of for c in token):
            table[token_id] = bytes(byte_of[c] for c in token)
        else:
            table[token_id] = token.encode("utf-8")
    special = frozenset(i for i, tok in added.items() if tok.special)
    return table, special


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    last = text[-1:]
    for stop in stops:
        if not last or last not in stop[:-1]:  # cheap common case: cannot start this stop string
            continue
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _find_stop(text: str, start: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string in text[start:] (ties: the first listed), as (index, string)."""
    found: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop, start)
        if index >= 0 and (found is None or index < found[0]):
            found = (index, stop)
    return found


class IncrementalDetokenizer:
    """Turns each sequence's new tokens into text. State lives on the sequence (`detok_state`)."""

    def __init__(self, tokenizer: Any, byte_level_fast_path: bool = True) -> None:
        self.tokenizer = tokenizer
        # The Rust tokenizer decodes without the Python wrapper's overhead; the wrapper is only
        # needed when it post-processes (clean_up_tokenization_spaces).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._backend = backend
        else:
            self._backend = None
        # Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): text is the UTF-8 decoding of the
        # tokens' bytes, so each step only decodes its new bytes (several times faster than two
        # window decodes: this runs for every token of every sequence).
        self._byte_table: list[bytes] | None = None
        self._special_ids: frozenset[int] = frozenset()
        if byte_level_fast_path and self._backend is not None:
            found = _byte_level_table(self._backend)
            if found is not None:
                self._byte_table, self._special_ids = found

    @property
    def uses_byte_level_fast_path(self) -> bool:
        return self._byte_table is not None

    def _decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def _state(self, seq: Sequence) -> _DetokState:
        state = seq.detok_state
        if isinstance(state, _DetokState):
            return state
        prompt_len = seq.num_prompt_tokens
        if self._byte_table is not None:
            return _DetokState(0, prompt_len, "")
        prefix_offset = max(prompt_len - _PROMPT_CONTEXT_TOKENS, 0)
        # Start the window on a whole character: byte-fallback decoders turn a whole run of byte
        # tokens into U+FFFDs when it begins inside a character, new tokens included.
        skip = seq.sampling_params.skip_special_tokens
        while prefix_offset < prompt_len and self._decode(
            seq.token_ids[prefix_offset:prompt_len], skip
        ).startswith(_REPLACEMENT_CHAR):
            prefix_offset += 1
        return _DetokState(prefix_offset, prompt_len, "")

    def _advance(
        self, seq: Sequence, state: _DetokState, flush: bool, token_ids: list[int]
    ) -> tuple[_DetokState, str]:
        """Decode token_ids past read_offset; returns the new state and text (empty while the
        text ends inside a character, unless flushing)."""
        if self._byte_table is not None:
            return self._advance_bytes(seq, state, flush, token_ids)
        if state.read_offset >= len(token_ids):
            return state, ""
        skip = seq.sampling_params.skip_special_tokens
        prefix_text = self._decode(token_ids[state.prefix_offset : state.read_offset], skip)
        full_text = self._decode(token_ids[state.prefix_offset :], skip)
        if len(full_text) <= len(prefix_text) or (full_text.endswith(_REPLACEMENT_CHAR) and not flush):
            return state, ""
        new_text = full_text[len(prefix_text) :]
        return _DetokState(state.read_offset, len(token_ids), state.text + new_text), new_text

    def _advance_bytes(
        self, seq: Sequence, state: _DetokState, flush: bool, token_ids: list[int]
    ) -> tuple[_DetokState, str]:
        table = self._byte_table
        assert table is not None
        new_ids = token_ids[state.read_offset :]
        if not new_ids and not (flush and state.pending):
            return state, ""
        skip = self._special_ids if seq.sampling_params.skip_special_tokens else frozenset()
        num_ids = len(table)
        if len(new_ids) == 1:  # the common case: one decoded token per step
            i = new_ids[0]
            data = state.pending + (table[i] if 0 <= i < num_ids and i not in skip else b"")
        else:
            data = state.pending + b"".join(table[i] for i in new_ids if 0 <= i < num_ids and i not in skip)
        # final=False stops before an incomplete trailing sequence: that part waits for more bytes.
        new_text, consumed = codecs.utf_8_decode(data, "replace", flush)
        new_state = _DetokState(
            0, max(len(token_ids), state.read_offset), state.text + new_text, data[consumed:]
        )
        return new_state, new_text

    def update(self, seq: Sequence) -> str | None:
        """Call after each appended token (or several). Updates seq.output_text (the emittable text,
        held-back characters excluded) and seq.detok_state; returns the matched stop string or None.

        On a match, seq.output_text is final: it ends exactly before the stop string (or after it
        with include_stop_str_in_output).
        """
        state, new_text = self._advance(seq, self._state(seq), False, seq.token_ids)
        return self._emit(seq, state, new_text, final=False)

    def finalize(self, seq: Sequence, drop_last_token: bool = False) -> str | None:
        """At a finish without a stop-string match (EOS, stop token, length, abort): flush the
        held-back text into seq.output_text. Returns a stop string found in the flushed tail (then
        cut as in `update`), else None.

        drop_last_token: the last token is a stop token whose text must not appear (vLLM leaves a
        stop token id's text out unless include_stop_str_in_output). Only effective when `update`
        has not been called for that token yet: emitted text is never taken back.
        """
        token_ids = seq.token_ids[:-1] if drop_last_token else seq.token_ids
        state, new_text = self._advance(seq, self._state(seq), True, token_ids)
        return self._emit(seq, state, new_text, final=True)

    def _emit(self, seq: Sequence, state: _DetokState, new_text: str, final: bool) -> str | None:
        params = seq.sampling_params
        stops = params.stop
        text = state.text
        # Like vLLM, stop strings count only once more than min_tokens tokens have been produced.
        if stops and new_text and seq.num_output_tokens > params.min_tokens:
            old_len = len(text) - len(new_text)
            start = max(old_len - (max(len(s) for s in stops) - 1), 0)
            match = _find_stop(text, start, stops)
            if match is not None:
                index, stop = match
                end = index + len(stop) if params.include_stop_str_in_output else index
                seq.detok_state = _DetokState(
                    state.prefix_offset, state.read_offset, text[:end], state.pending
                )
                seq.output_text = text[:end]
                return stop
        seq.detok_state = state
        hold = 0 if final or not stops else _partial_stop_len(text, stops)
        seq.output_text = text[: len(text) - hold]
        return None
