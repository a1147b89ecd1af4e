"""OpenAI request bodies → validated, tokenized requests for the engine.

Every error names the parameter (`param` in the OpenAI error body). Parsing is pure: it needs
only the tokenizer, the served model name and the length limits, so it is tested without HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.engine.sequence import SamplingParams
from appliance.errors import InvalidRequestError, ModelNotFoundError, PromptTooLongError
from appliance.server import tools as tool_calls
from appliance.structured.spec import GrammarSpec, parse_response_format, parse_structured_outputs

CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}
_SAMPLING_FIELDS = frozenset({
    "model", "stream", "stream_options", "n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids", "ignore_eos",
    "min_tokens", "logprobs", "skip_special_tokens", "include_stop_str_in_output", "user", "logit_bias",
    "response_format", "structured_outputs",
    # Accepted with a meaning we honour: nothing is stored (store false/absent) and metadata is
    # only echoed by OpenAI's stored completions, which we do not keep.
    "store", "metadata",
})
CHAT_FIELDS = _SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                                  "parallel_tool_calls"}
COMPLETION_FIELDS = _SAMPLING_FIELDS | {"prompt", "echo", "best_of", "suffix"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI legacy completions default
MAX_TOP_LOGPROBS = 20


@dataclass
class ParsedRequest:
    """One HTTP request: one or more prompts, each run as its own engine request with `params`."""

    model: str
    prompts: list[list[int]]  # token ids, one list per prompt
    prompt_texts: list[str | None]  # for `echo` (completions); None when given as token ids
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: bool  # return logprobs (chat: `logprobs`; completions: `logprobs` not None)
    top_logprobs: int
    echo: bool
    user: str | None
    tools: tool_calls.ToolConfig | None = None  # chat with tools (not 'none'): parse/force calls
    score_only: bool = False  # completions max_tokens 0 with echo: the one sampled token is dropped

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def reserved_tokens(self, max_model_len: int) -> int:
        """Prompt tokens plus the most the request can generate: what tokens/min quotas book."""
        total = 0
        for prompt in self.prompts:
            max_out = self.params.max_tokens or max(max_model_len - len(prompt), 0)
            total += len(prompt) + max_out * self.params.n
        return total


def _bad(param: str, expected: str, value: object = None, *, show_value: bool = True) -> InvalidRequestError:
    got = f", got {value!r}" if show_value else ""
    return InvalidRequestError(f"'{param}' must be {expected}{got}", param=param)


def _opt(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any, expected: str) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is never a valid number here.
    if isinstance(value, bool) and kind is not bool:
        raise _bad(name, expected, value)
    if not isinstance(value, kind):
        raise _bad(name, expected, value)
    return value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    return float(_opt(body, name, (int, float), default, "a number"))


def check_model(body: dict[str, Any], served_model_name: str) -> str:
    model = body.get("model")
    if model is None:
        return served_model_name
    if not isinstance(model, str):
        raise _bad("model", "a string", model)
    if model != served_model_name:
        raise ModelNotFoundError(
            f"The model '{model}' does not exist; this server serves '{served_model_name}'",
            param="model", code="model_not_found",
        )
    return model


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise _bad("stop", "a string or a list of strings", show_value=False)


def check_fields(body: dict[str, Any], known: frozenset[str]) -> None:
    """A field we do not implement is a 400 naming it, never silently ignored."""
    unknown = sorted(k for k in body if k not in known and body[k] is not None)
    if unknown:
        raise InvalidRequestError(f"unsupported parameter(s): {', '.join(repr(k) for k in unknown)}",
                                  param=unknown[0], code="unsupported_parameter")


def _logit_bias(body: dict[str, Any], vocab_size: int | None) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    expected = f"a map of token ids (in [0, {vocab_size})) to numbers in [-100, 100]"
    if not isinstance(bias, dict) or len(bias) > 300:
        raise _bad("logit_bias", expected + ", at most 300 entries", show_value=False)
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise _bad("logit_bias", expected, {key: value}) from None
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100
                or token_id < 0 or (vocab_size is not None and token_id >= vocab_size)):
            raise _bad("logit_bias", expected, {key: value})
        out[token_id] = float(value)
    return out or None


def structured_spec(body: dict[str, Any], forced: GrammarSpec | None = None) -> GrammarSpec | None:
    """The request's one output constraint: response_format, structured_outputs or forced tool calls."""
    specs = [(name, spec) for name, spec in (
        ("response_format", parse_response_format(body.get("response_format"))),
        ("structured_outputs", parse_structured_outputs(body.get("structured_outputs"))),
        ("tool_choice", forced)) if spec is not None]
    if len(specs) > 1:
        raise _bad(specs[1][0], f"cannot be combined with '{specs[0][0]}' (one output constraint per request)",
                   show_value=False)
    return specs[0][1] if specs else None


def _sampling_params(
    body: dict[str, Any], *, max_tokens: int | None, n: int, logprobs: int | None,
    structured: GrammarSpec | None = None, vocab_size: int | None = None,
) -> SamplingParams:
    stop_token_ids = _opt(body, "stop_token_ids", list, [], "a list of token ids")
    if body.get("store") not in (None, False):
        raise _bad("store", "false: this server stores no completions", body.get("store"))
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids):
        raise _bad("stop_token_ids", "a list of token ids", stop_token_ids)
    seed = _opt(body, "seed", int, None, "an integer")
    params = SamplingParams(
        n=n,
        max_tokens=max_tokens,
        min_tokens=_opt(body, "min_tokens", int, 0, "a non-negative integer"),
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=_opt(body, "top_k", int, 0, "an integer"),
        min_p=_number(body, "min_p", 0.0),
        seed=seed,
        presence_penalty=_number(body, "presence_penalty", 0.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        stop=_stop(body),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=_opt(body, "ignore_eos", bool, False, "a boolean"),
        logprobs=logprobs,
        skip_special_tokens=_opt(body, "skip_special_tokens", bool, True, "a boolean"),
        include_stop_str_in_output=_opt(body, "include_stop_str_in_output", bool, False, "a boolean"),
        logit_bias=_logit_bias(body, vocab_size),
        structured=structured,
    )
    if params.top_k < 0:  # -1 means "off" in vLLM; the engine's off is 0
        params.top_k = 0
    try:
        params.validate()
    except InvalidRequestError as exc:
        # The engine's message quotes the value; for `stop` that is user text, keep it out.
        if exc.param == "stop":
            raise _bad("stop", "at most 16 non-empty strings", show_value=False) from None
        raise
    return params


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _bad("stream_options", "an object", options)
    if not stream:
        raise _bad("stream_options", "set only when 'stream' is true", options)
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise _bad("stream_options.include_usage", "a boolean", include)
    return include


def _check_length(prompt: list[int], params: SamplingParams, max_model_len: int, param: str) -> None:
    if len(prompt) + 1 > max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{len(prompt)} tokens, which leaves no room for output",
            param=param, code="context_length_exceeded",
        )
    if params.max_tokens is not None and len(prompt) + params.max_tokens > max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{len(prompt)} tokens and max_tokens asks for {params.max_tokens} more",
            param="max_tokens", code="context_length_exceeded",
        )


def _message_text(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{index}].content", "a string or a list of text parts", show_value=False)
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{index}].content", "a string or a list of text parts", show_value=False)


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of messages", show_value=False)
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", "an object with 'role' and 'content'", show_value=False)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"messages[{i}].role", f"one of {sorted(CHAT_ROLES)}", role)
        item: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                "content": _message_text(message, i)}
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str) for c in calls):
                raise _bad(f"messages[{i}].tool_calls", "a list of function calls on an assistant message",
                           show_value=False)
            item["tool_calls"] = calls
        if role == "tool":
            item["tool_call_id"] = message.get("tool_call_id")
        out.append(item)
    return out


def parse_chat(
    body: dict[str, Any], *, render_chat: Callable[..., list[int]], served_model_name: str,
    max_model_len: int, default_max_tokens: int | None, chat_template: str | None = None,
    vocab_size: int | None = None, tool_call_parser: str = "auto",
) -> ParsedRequest:
    """render_chat: the engine's chat rendering (`AsyncEngine.render_chat`), (messages, tools=) ->
    prompt ids. chat_template: its text, which picks the tool-call format (server/tools.py)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    check_fields(body, CHAT_FIELDS)
    model = check_model(body, served_model_name)
    tools = tool_calls.parse_tools(body, chat_template, tool_call_parser)
    messages = chat_messages(body)
    stream = _opt(body, "stream", bool, False, "a boolean")
    include_usage = _stream_options(body, stream)
    n = _opt(body, "n", int, 1, "an integer in [1, 128]")
    max_tokens = _opt(body, "max_completion_tokens", int, None, "a positive integer")
    if max_tokens is None:
        max_tokens = _opt(body, "max_tokens", int, default_max_tokens, "a positive integer")
    want_logprobs = _opt(body, "logprobs", bool, False, "a boolean")
    top_logprobs = _opt(body, "top_logprobs", int, None, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
    if top_logprobs is not None:
        if not want_logprobs:
            raise _bad("top_logprobs", "used only with 'logprobs': true", top_logprobs)
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise _bad("top_logprobs", f"an integer in [0, {MAX_TOP_LOGPROBS}]", top_logprobs)
    top = top_logprobs or 0
    structured = structured_spec(body, tool_calls.forced_spec(tools) if tools is not None else None)
    params = _sampling_params(body, max_tokens=max_tokens, n=n, logprobs=top if want_logprobs else None,
                              structured=structured, vocab_size=vocab_size)
    if tools is not None and tools.active and tools.parser.name == "mistral":
        params.skip_special_tokens = False  # its [TOOL_CALLS] marker is a special token
    template_msgs, template_tools = tool_calls.template_messages(messages, tools)
    prompt = render_chat(template_msgs, tools=template_tools)
    _check_length(prompt, params, max_model_len, "messages")
    return ParsedRequest(
        model=model, prompts=[prompt], prompt_texts=[None], params=params, stream=stream,
        include_usage=include_usage, logprobs=want_logprobs, top_logprobs=top, echo=False,
        user=_opt(body, "user", str, None, "a string"), tools=tools if tools is not None and tools.active else None,
    )


def _prompts(body: dict[str, Any], tokenizer: Any) -> tuple[list[list[int]], list[str | None]]:
    prompt = body.get("prompt")

    def is_ids(x: object) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        texts: list[str] = [prompt]
    elif is_ids(prompt):
        return [list(prompt)], [None]  # type: ignore[arg-type]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
        return [list(p) for p in prompt], [None] * len(prompt)
    else:
        raise _bad("prompt", "a string, a list of strings, a list of token ids or a list of those",
                    show_value=False)
    if len(texts) > 64:
        raise _bad("prompt", "at most 64 prompts", len(texts))
    ids = [list(tokenizer.encode(t, add_special_tokens=True)) for t in texts]
    for i, p in enumerate(ids):
        if not p:
            raise _bad("prompt", "non-empty", show_value=False) if len(ids) == 1 else _bad(
                f"prompt[{i}]", "non-empty", show_value=False)
    return ids, list(texts)


def parse_completion(
    body: dict[str, Any], *, tokenizer: Any, served_model_name: str, max_model_len: int,
    default_max_tokens: int | None,
) -> ParsedRequest:
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    check_fields(body, COMPLETION_FIELDS)
    model = check_model(body, served_model_name)
    if body.get("suffix"):
        raise InvalidRequestError("'suffix' is not supported", param="suffix")
    stream = _opt(body, "stream", bool, False, "a boolean")
    include_usage = _stream_options(body, stream)
    n = _opt(body, "n", int, 1, "an integer in [1, 128]")
    best_of = _opt(body, "best_of", int, None, "an integer equal to n")
    if best_of is not None and best_of != n:
        raise _bad("best_of", "equal to n (best_of > n is not supported)", best_of)
    max_tokens = _opt(body, "max_tokens", int, default_max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS,
                      "a positive integer (0: score the prompt, with echo)")
    logprobs = _opt(body, "logprobs", int, None, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise _bad("logprobs", f"an integer in [0, {MAX_TOP_LOGPROBS}]", logprobs)
    echo = _opt(body, "echo", bool, False, "a boolean")
    # max_tokens 0 (lm-eval's loglikelihood): the prompt is scored, nothing is generated. The
    # engine samples one token (its step computes the last prompt position), which is dropped.
    score_only = max_tokens == 0
    if score_only and not echo:
        raise _bad("max_tokens", "positive unless 'echo' is true (max_tokens 0 scores the echoed prompt)", 0)
    if score_only and stream:
        raise _bad("max_tokens", "positive when streaming", 0)
    vocab_size = len(tokenizer)
    params = _sampling_params(body, max_tokens=1 if score_only else max_tokens, n=n, logprobs=logprobs,
                              structured=structured_spec(body), vocab_size=vocab_size)
    if echo and logprobs is not None:
        params.prompt_logprobs = logprobs  # the echoed prompt's tokens get their logprobs
    prompts, texts = _prompts(body, tokenizer)
    for i, prompt in enumerate(prompts):
        _check_length(prompt, params, max_model_len, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
        if any(t < 0 or t >= vocab_size for t in prompt):
            raise _bad("prompt", f"token ids in [0, {vocab_size})", show_value=False)
    return ParsedRequest(
        model=model, prompts=prompts, prompt_texts=texts, params=params, stream=stream,
        include_usage=include_usage, logprobs=logprobs is not None, top_logprobs=logprobs or 0, echo=echo,
        user=_opt(body, "user", str, None, "a string"), score_only=score_only,
    )
