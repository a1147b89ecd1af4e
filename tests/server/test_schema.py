"""Request parsing: OpenAI bodies → SamplingParams, every error naming its parameter."""

from __future__ import annotations

import pytest

from appliance.errors import InvalidRequestError, ModelNotFoundError, PromptTooLongError
from appliance.models.tokenizer import apply_chat_template
from appliance.server.schema import parse_chat, parse_completion

from .conftest import MAX_MODEL_LEN, MODEL


def _chat(tokenizer, **body):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body}
    return parse_chat(body, render_chat=lambda messages, tools=None: apply_chat_template(tokenizer, messages,
                                                                                         tools=tools),
                      served_model_name=MODEL, max_model_len=MAX_MODEL_LEN, default_max_tokens=None)


def _completion(tokenizer, **body):
    body = {"model": MODEL, "prompt": "Hi", **body}
    return parse_completion(body, tokenizer=tokenizer, served_model_name=MODEL, max_model_len=MAX_MODEL_LEN,
                            default_max_tokens=None)


def test_chat_maps_every_sampling_parameter(tokenizer):
    parsed = _chat(tokenizer, n=2, max_completion_tokens=7, temperature=0.5, top_p=0.9, top_k=-1, min_p=0.05,
                   seed=3, stop="END", presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.1,
                   logprobs=True, top_logprobs=4, stream=True, stream_options={"include_usage": True}, user="u1",
                   messages=[{"role": "developer", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    p = parsed.params
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (2, 7, 0.5, 0.9, 0, 0.05, 3)
    assert (p.stop, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (["END"], 0.5, -0.5, 1.1)
    assert p.logprobs == 4 and parsed.top_logprobs == 4 and parsed.logprobs
    assert parsed.stream and parsed.include_usage and parsed.user == "u1"
    text = tokenizer.decode(parsed.prompts[0])
    assert "Be brief." in text and text.rstrip().endswith("assistant")  # system turn kept, assistant opened
    assert _chat(tokenizer).params.max_tokens is None  # chat: up to max_model_len by default
    assert _completion(tokenizer).params.max_tokens == 16  # completions: OpenAI's default


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"n": 1.5}, "n"),
    ({"stop": [1, 2]}, "stop"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"seed": "x"}, "seed"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"logit_bias": {"5": 200}}, "logit_bias"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_chat_errors_name_the_parameter(tokenizer, body, param):
    with pytest.raises(InvalidRequestError) as info:
        _chat(tokenizer, **body)
    assert info.value.param == param and info.value.http_status == 400


def test_stop_strings_are_not_quoted_back(tokenizer):
    with pytest.raises(InvalidRequestError) as info:
        _chat(tokenizer, stop=["secret"] * 17)
    assert "secret" not in info.value.message


def test_model_and_length_checks(tokenizer):
    with pytest.raises(ModelNotFoundError) as info:
        _chat(tokenizer, model="other")
    assert info.value.http_status == 404 and info.value.param == "model"
    with pytest.raises(PromptTooLongError) as info:
        _completion(tokenizer, prompt=[5] * MAX_MODEL_LEN)
    assert info.value.param == "prompt" and info.value.code == "context_length_exceeded"
    with pytest.raises(PromptTooLongError) as info:
        _completion(tokenizer, prompt=[5] * 10, max_tokens=MAX_MODEL_LEN)
    assert info.value.param == "max_tokens"


def test_completion_prompt_forms(tokenizer):
    ids = tokenizer.encode("Hello world")
    assert _completion(tokenizer, prompt="Hello world").prompts == [ids]
    assert _completion(tokenizer, prompt=ids).prompts == [ids]
    assert _completion(tokenizer, prompt=["a", "b"]).prompts == [tokenizer.encode("a"), tokenizer.encode("b")]
    assert _completion(tokenizer, prompt=[ids, ids]).prompt_texts == [None, None]
    parsed = _completion(tokenizer, prompt=["a", "bc"], n=2, max_tokens=5)
    assert parsed.reserved_tokens(MAX_MODEL_LEN) == parsed.num_prompt_tokens + 2 * 2 * 5
    for bad, param in [(["a", [1]], "prompt"), ([len(tokenizer) + 5], "prompt"), ("", "prompt"),
                       ({"x": 1}, "prompt")]:
        with pytest.raises(InvalidRequestError) as info:
            _completion(tokenizer, prompt=bad)
        assert info.value.param == param
    with pytest.raises(InvalidRequestError) as info:
        _completion(tokenizer, best_of=3)
    assert info.value.param == "best_of"
    assert _completion(tokenizer, logprobs=3, echo=True).top_logprobs == 3
