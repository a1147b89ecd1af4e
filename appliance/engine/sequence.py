"""Requests, sequences and what the engine hands back. No torch here.

A request (one `add_request` call) owns `n` sequences. With n > 1 the prompt is prefilled once
(by the first sequence); when its first token is sampled the other n-1 sequences are forked
from it and share every prompt block (reference counts), copying only the last partial block.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from appliance.engine.outputs import TokenLogprob
from appliance.errors import InvalidRequestError, PromptTooLongError
from appliance.structured.spec import GrammarSpec  # [apps] at runtime: the engine-process codec resolves it

__all__ = ["FinishReason", "PLACEHOLDER_TOKEN_ID", "SamplingParams", "Sequence", "SequenceStatus", "TokenLogprob",
           "validate_request"]


@dataclass
class SamplingParams:
    """Per-request sampling options, with OpenAI/vLLM meanings.

    temperature 0 means greedy. top_k <= 0 means off. logprobs: None = none, k >= 0 = the sampled
    token's logprob plus the top-k alternatives. max_tokens None = up to max_model_len.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # [apps] constrained decoding (appliance/structured/) and OpenAI's logit_bias (token id -> bias)
    structured: GrammarSpec | None = None
    logit_bias: dict[int, float] | None = None
    # [apps] logprobs of the prompt's tokens (+ top-k alternatives), for echo/scoring; None: off
    prompt_logprobs: int | None = None

    def validate(self) -> None:
        """Raise InvalidRequestError naming the parameter when a value is impossible."""

        def bad(param: str, expected: str, value: object) -> InvalidRequestError:
            return InvalidRequestError(f"'{param}' must be {expected}, got {value!r}", param=param)

        if not isinstance(self.n, int) or not 1 <= self.n <= 128:
            raise bad("n", "an integer in [1, 128]", self.n)
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
            raise bad("max_tokens", "a positive integer", self.max_tokens)
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "a non-negative integer", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"at most max_tokens ({self.max_tokens})", self.min_tokens)
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "in [0, 100]", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]", self.top_p)
        if not isinstance(self.top_k, int):
            raise bad("top_k", "an integer (0 or -1 disables it)", self.top_k)
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]", self.min_p)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "in [-2, 2]", self.presence_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", "in (0, 10]", self.repetition_penalty)
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "an integer in [0, 20]", self.logprobs)
        if len(self.stop) > 16 or any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "at most 16 non-empty strings", self.stop)
        if self.logit_bias is not None and any(
            not isinstance(k, int) or isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100
            for k, v in self.logit_bias.items()
        ):
            raise bad("logit_bias", "a map of token ids to numbers in [-100, 100]", self.logit_bias)
        if self.prompt_logprobs is not None and (
                not isinstance(self.prompt_logprobs, int) or not 0 <= self.prompt_logprobs <= 20):
            raise bad("prompt_logprobs", "an integer in [0, 20]", self.prompt_logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate_request(prompt_token_ids: list[int], params: SamplingParams, *, vocab_size: int,
                     max_model_len: int) -> None:
    """Raise the typed error a client gets (400) when the engine could not run this request.

    The one place for these checks: the front end calls it before anything is sent to the core
    (a rejected request never reaches it), and the core again on `add_request` (offline use).
    """
    params.validate()
    if not prompt_token_ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    if any((not isinstance(t, int)) or t < 0 or t >= vocab_size for t in prompt_token_ids):
        raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab_size})", param="prompt")
    if len(prompt_token_ids) + 1 > max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{len(prompt_token_ids)} tokens, leaving no room for output.", param="messages",
            code="context_length_exceeded")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, its blocks freed (recompute)
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # cancelled by the client or the operator


_seq_ids = itertools.count()

# Async scheduling: a sampled token whose id is still on the device. It stands at the end of
# `Sequence.token_ids` (so lengths are right for the next schedule) until the step's results
# arrive; the model runner feeds it to the next step from the device, never from this value.
PLACEHOLDER_TOKEN_ID = -1


class Sequence:
    """One token stream: the prompt plus what has been generated so far.

    NOTE: `num_computed_tokens` counts tokens whose K/V are in the cache. The scheduler advances
    it; the block manager sizes `block_table` to cover every token that will be computed.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        index: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n choices this is
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt + output
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.table_version = 0  # bumped by the block manager on every change of block_table
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by prefix-cache hits (last admission)
        self.num_hashed_blocks = 0  # leading blocks of block_table already hashed (block manager)
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None  # the stop string or token id that matched
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        # [apps] SamplingParams.prompt_logprobs: one entry per prompt token (the first None), filled
        # by the model runner as prefill chunks run; handed out once with the request's first delta.
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.num_preemptions = 0
        # Text state: the detokenizer owns output_text and detok_state; the core's output stage
        # owns num_text_sent (how much of output_text has gone out in deltas).
        self.output_text = ""
        self.detok_state: object | None = None
        self.num_text_sent = 0
        # Kept only when the engine reports finished requests only (offline) and logprobs are asked.
        self.logprobs: list[TokenLogprob] = []
        # For n > 1: the request's first sequence prefills alone, then is forked.
        self.pending_forks = sampling_params.n - 1 if index == 0 else 0
        # Async scheduling: the token still on the device reaches max_tokens or max_model_len, so
        # the sequence finishes when it arrives: the scheduler gives it no further step.
        self.finish_pending = False

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than one token still to compute (prompt, or re-prefill after preemption)."""
        return self.num_uncomputed_tokens > 1

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id!r}, len={len(self)}, "
            f"computed={self.num_computed_tokens}, status={self.status.value})"
        )
