"""The requests of a run: `random`, `shared-prefix` or `chat` (a JSONL file of conversations).

Random prompts are random token ids turned into text with the model's tokenizer and fixed until
the text encodes back to exactly the asked number of tokens (decode, re-encode, truncate or pad,
repeat), so the server sees the intended input length; the special tokens the server adds (BOS) are
counted in it, as `vllm bench serve --dataset-name random` does. Lengths are fixed (`512`) or drawn
uniformly from a range (`256:1024`). The random generator is seeded with the seed, the prompt
stream (sweep point, probe, warm-up) and the workload's shape together (`WorkloadSpec.rng_key`):
runs that differ in any of them share no prompt prefix, so a run cannot find its prompts already in
the server's prefix cache from an earlier run of another shape. (vLLM 0.26's random dataset starts
each prompt at an offset drawn from the seed alone, so at one seed its 256-token prompts are the
heads of its 512-token ones, and so were ours before.) The same command draws the same prompts:
run it twice against one server and the second run meets them in the prefix cache; give each
repeat its own --seed, or measure with the server's prefix caching off. `shared-prefix`: one random prefix shared by every request
(the system message on the chat endpoint) and a unique random question after it.

Conversations: one JSON value per line: `{"messages": [...]}` (OpenAI shape, optional
`max_tokens`), a bare list of messages, or ShareGPT's `{"conversations": [{"from", "value"}]}`. A
trailing assistant turn is dropped and its length becomes the request's max_tokens unless
`--output-len` is given.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

WORKLOADS = ("random", "shared-prefix", "chat")


class Tokenizer(Protocol):
    """The part of a transformers tokenizer used here."""

    vocab_size: int
    all_special_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int], **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class BenchRequest:
    index: int
    max_tokens: int
    prompt_len: int = 0  # tokens the server should count (0: unknown; its usage says)
    prefix: str = ""  # shared part (shared-prefix): the prompt's head, or the system message on chat
    body: str = ""  # the unique part
    messages: tuple[dict[str, Any], ...] | None = None  # a conversation (chat workload)

    @property
    def prompt(self) -> str | None:
        """The completions prompt; None for a conversation."""
        return None if self.messages is not None else self.prefix + self.body

    def chat_messages(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        head = [{"role": "system", "content": self.prefix}] if self.prefix else []
        return [*head, {"role": "user", "content": self.body}]


@dataclass(frozen=True)
class LengthRange:
    low: int
    high: int

    @classmethod
    def parse(cls, text: str, what: str) -> LengthRange:
        lo, sep, hi = text.partition(":")
        try:
            low, high = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"{what} {text!r}: expected N or LOW:HIGH (tokens)") from None
        if low < 1 or high < low:
            raise ValueError(f"{what} {text!r}: need 1 <= LOW <= HIGH")
        return cls(low, high)

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def describe(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class WorkloadSpec:
    kind: str
    num_prompts: int
    input_len: LengthRange
    output_len: LengthRange | None  # None: chat lengths from the file
    prefix_len: int = 0
    chat_path: Path | None = None
    seed: int = 0
    stream: str = ""  # which of a run's prompt sets (a sweep point, a capacity probe, the warm-up)

    def rng_key(self) -> str:
        """What seeds the prompts: the seed, the stream and the whole shape. Two workloads that differ
        in anything share no prompt prefix (a 256-token prompt is not the head of a 512-token one of
        the same seed), so one run cannot warm the server's prefix cache for the next; the same
        command still draws the same prompts."""
        return (f"bench-serve|seed={self.seed}|stream={self.stream}|{self.kind}|in={self.input_len}"
                f"|out={self.output_len}|prefix={self.prefix_len}")

    def describe(self) -> str:
        out = self.output_len.describe() if self.output_len else "as in the file"
        if self.kind == "chat":
            return f"chat conversations from {self.chat_path.name if self.chat_path else '?'}, out {out}"
        prefix = f"shared prefix {self.prefix_len} + " if self.kind == "shared-prefix" else ""
        return f"in {prefix}{self.input_len.describe()}, out {out} tokens"


class PromptMaker:
    """Random token ids to text of an exact token count."""

    def __init__(self, tokenizer: Tokenizer, rng: random.Random) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        special = set(tokenizer.all_special_ids)
        self.allowed = [i for i in range(tokenizer.vocab_size) if i not in special]
        # BOS and the like, which the server adds to a text prompt.
        self.num_special = len(tokenizer.encode("a", add_special_tokens=True)) - len(
            tokenizer.encode("a", add_special_tokens=False))
        self.mismatched = 0  # prompts that could not be fixed to their exact length

    def random_ids(self, n: int) -> list[int]:
        return [self.rng.choice(self.allowed) for _ in range(n)]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        # NOTE: a tokenizers.Tokenizer encodes a batch on all cores; 512 random 512-token prompts
        # took 15 s one by one on a slow 2-core box (BPE over random bytes is its worst case).
        batch = getattr(self.tokenizer, "encode_batch", None)
        if batch is not None:
            return [list(ids) for ids in batch(texts, add_special_tokens=False)]
        return [self._encode(t) for t in texts]

    def _decode_many(self, id_lists: list[list[int]]) -> list[str]:
        batch = getattr(self.tokenizer, "decode_batch", None)
        if batch is not None:
            return list(batch(id_lists, skip_special_tokens=False))
        return [self._decode(ids) for ids in id_lists]

    def exact_text(self, ids: list[int], max_rounds: int = 16) -> tuple[str, int]:
        """Text whose encoding has len(ids) tokens (or as close as `max_rounds` fixes got)."""
        return self.exact_texts([ids], max_rounds)[0]

    def exact_texts(self, id_lists: list[list[int]], max_rounds: int = 16) -> list[tuple[str, int]]:
        """exact_text for many at once (the encoding in batches)."""
        targets = [len(ids) for ids in id_lists]
        texts = self._decode_many(id_lists)
        pending = list(range(len(id_lists)))
        for _ in range(max_rounds):
            if not pending:
                break
            retry: list[tuple[int, list[int]]] = []
            for i, again in zip(pending, self._encode_many([texts[i] for i in pending]), strict=True):
                if len(again) != targets[i]:
                    # Byte-level BPE merges across token boundaries: cut or pad, then look again.
                    t = targets[i]
                    retry.append((i, again[:t] if len(again) > t else again + self.random_ids(t - len(again))))
            for (i, _), text in zip(retry, self._decode_many([ids for _, ids in retry]), strict=True):
                texts[i] = text
            pending = [i for i, _ in retry]
        out = [(text, target) for text, target in zip(texts, targets, strict=True)]
        if pending:
            self.mismatched += len(pending)
            for i, again in zip(pending, self._encode_many([texts[i] for i in pending]), strict=True):
                out[i] = (texts[i], len(again))
        return out

    def exact_suffix(self, prefix_text: str, n: int, max_rounds: int = 16) -> tuple[str, int]:
        """Text that brings `prefix_text` + it to len(encode(prefix_text)) + n tokens."""
        base = len(self._encode(prefix_text))
        body = self._decode(self.random_ids(n))
        for _ in range(max_rounds):
            got = len(self._encode(prefix_text + body)) - base
            if got == n:
                return body, n
            ids = self._encode(body)
            ids = ids[: max(len(ids) - (got - n), 1)] if got > n else ids + self.random_ids(n - got)
            body = self._decode(ids)
        self.mismatched += 1
        return body, len(self._encode(prefix_text + body)) - base


def build(spec: WorkloadSpec, tokenizer: Tokenizer | None) -> list[BenchRequest]:
    rng = random.Random(spec.rng_key())  # a str seeds through SHA-512: stable across runs and Pythons
    if spec.kind == "chat":
        if spec.chat_path is None:
            raise ValueError("the chat workload needs --dataset FILE.jsonl")
        return _conversations(spec, tokenizer, rng)
    if spec.kind not in WORKLOADS:
        raise ValueError(f"unknown workload {spec.kind!r}: one of {', '.join(WORKLOADS)}")
    if tokenizer is None:
        raise ValueError(f"the {spec.kind} workload builds prompts with the model's tokenizer: pass --tokenizer")
    assert spec.output_len is not None
    maker = PromptMaker(tokenizer, rng)
    prefix, prefix_len = "", 0
    if spec.kind == "shared-prefix":
        if spec.prefix_len < 1:
            raise ValueError("shared-prefix needs --prefix-len >= 1")
        prefix, prefix_len = maker.exact_text(maker.random_ids(spec.prefix_len))
    shapes = []
    for _ in range(spec.num_prompts):
        # The server adds its special tokens to the text: leave room for them.
        n_text = max(spec.input_len.draw(rng) - maker.num_special, 1)
        shapes.append((n_text, spec.output_len.draw(rng)))
    if prefix:
        bodies = [maker.exact_suffix(prefix, n_text) for n_text, _ in shapes]
    else:
        bodies = maker.exact_texts([maker.random_ids(n_text) for n_text, _ in shapes])
    requests = [BenchRequest(index=i, max_tokens=max_tokens, prefix=prefix, body=body,
                             prompt_len=maker.num_special + prefix_len + n_body)
                for i, ((_, max_tokens), (body, n_body)) in enumerate(zip(shapes, bodies, strict=True))]
    if maker.mismatched:
        print(f"note: {maker.mismatched} prompt(s) could not be made exactly their length "
              "(the server's usage counts are what the results use)")
    return requests


def _conversation_messages(value: Any, where: str) -> tuple[list[dict[str, Any]], int | None]:
    max_tokens = None
    if isinstance(value, dict) and "conversations" in value:
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system"}
        try:
            messages = [{"role": roles[t["from"]], "content": t["value"]} for t in value["conversations"]]
        except (KeyError, TypeError):
            raise ValueError(f"{where}: ShareGPT turns need 'from' (human/gpt/system) and 'value'") from None
    elif isinstance(value, dict) and "messages" in value:
        messages, max_tokens = value["messages"], value.get("max_tokens")
    elif isinstance(value, list):
        messages = value
    else:
        raise ValueError(f"{where}: expected {{\"messages\": [...]}}, a list of messages or ShareGPT's "
                         "{\"conversations\": [...]}")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"{where}: messages must be objects with a 'role'")
    return messages, max_tokens


def _conversations(spec: WorkloadSpec, tokenizer: Tokenizer | None, rng: random.Random) -> list[BenchRequest]:
    assert spec.chat_path is not None
    requests: list[BenchRequest] = []
    with open(spec.chat_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(requests) >= spec.num_prompts:
                break
            if not line.strip():
                continue
            where = f"{spec.chat_path}:{lineno}"
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{where}: not JSON ({exc})") from None
            messages, max_tokens = _conversation_messages(value, where)
            if messages and messages[-1]["role"] == "assistant":
                answer = messages.pop()
                if max_tokens is None and tokenizer is not None and isinstance(answer.get("content"), str):
                    max_tokens = max(len(tokenizer.encode(answer["content"], add_special_tokens=False)), 1)
            if not messages or messages[-1]["role"] != "user":
                continue  # nothing to answer
            if spec.output_len is not None:
                max_tokens = spec.output_len.draw(rng)
            if max_tokens is None:
                raise ValueError(f"{where}: no max_tokens, no trailing assistant turn to size the answer "
                                 "(or no --tokenizer to count it): pass --output-len")
            requests.append(BenchRequest(index=len(requests), max_tokens=int(max_tokens),
                                         messages=tuple(messages)))
    if not requests:
        raise ValueError(f"{spec.chat_path}: no conversation ending in a user turn")
    if len(requests) < spec.num_prompts:
        print(f"note: {spec.chat_path} has {len(requests)} usable conversations (asked for {spec.num_prompts})")
    return requests


class JsonTokenizer:
    """A dir's tokenizer.json through the `tokenizers` library: the same token ids as transformers'
    fast tokenizer (whose backend it is), without loading transformers and, through it, torch."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self._tok = RustTokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=False)
        self.all_special_ids = sorted(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=bool(kwargs.get("skip_special_tokens", False))))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode_batch(self, id_lists: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        return [str(t) for t in self._tok.decode_batch(id_lists, skip_special_tokens=skip_special_tokens)]


def load_tokenizer(name_or_dir: str) -> Tokenizer:
    """tokenizer.json of a local dir; else transformers: the local Hugging Face cache first, then
    the hub, only when its host resolves (an offline box would otherwise spend ~25 s in retries
    before the same error)."""
    path = Path(name_or_dir).expanduser()
    if (path / "tokenizer.json").is_file():
        return JsonTokenizer(path / "tokenizer.json")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_dir, local_files_only=True)
    except (OSError, ValueError):
        pass
    if not _hub_resolves():
        raise ValueError(f"cannot load a tokenizer from {name_or_dir!r}: not a local directory with "
                         "tokenizer.json, not in the Hugging Face cache, and the hub is out of reach (HF_HUB_OFFLINE, "
                         "or its host does not resolve); pass --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(name_or_dir)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a tokenizer from {name_or_dir!r} ({exc}); pass --tokenizer DIR") from None


def _hub_resolves() -> bool:
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True
