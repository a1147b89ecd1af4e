"""Structured outputs and tool calls through the official openai SDK, against the default model.

Every structured answer is parsed and validated against its schema (jsonschema), so a grammar
that let anything through would fail here even when the 135M model happens to write JSON.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.apps_server import apps_served  # noqa: F401 - the shared server fixture
from tests.server.conftest import MODEL, http_request

# test_structured_separate.py runs constrained requests through the engine process.
pytestmark = [pytest.mark.usefixtures("default_model_dir"),
              pytest.mark.parametrize("engine_and_gate", ["inline"], indirect=True)]


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int
    role: Literal["admin", "editor", "viewer"]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 12}},
                   "required": ["tz"], "additionalProperties": False}}}


@pytest.fixture
def served(apps_served: Any) -> Any:  # noqa: F811 - the imported fixture
    return apps_served


def _ask(content: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def test_sdk_parse_with_a_pydantic_model_returns_a_valid_instance(served: Any) -> None:
    client = served.client()
    completion = client.chat.completions.parse(
        model=MODEL, messages=_ask("Invent a person."), response_format=Person, max_tokens=48, temperature=0)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person)
    jsonschema.validate(json.loads(completion.choices[0].message.content), Person.model_json_schema())


def test_json_schema_response_format_validates_and_streams(served: Any) -> None:
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}, "population": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["big", "old", "cold"]}, "maxItems": 3},
        "mayor": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}},
                  "required": ["name"], "additionalProperties": False}},
        "required": ["city", "population", "tags", "mayor"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    client = served.client()
    whole = client.chat.completions.create(model=MODEL, messages=_ask("Describe Paris."), response_format=fmt,
                                           max_tokens=80, temperature=0)
    jsonschema.validate(json.loads(whole.choices[0].message.content), schema)
    stream = client.chat.completions.create(model=MODEL, messages=_ask("Describe Oslo."), response_format=fmt,
                                            max_tokens=80, temperature=0.7, seed=3, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_json_object_regex_and_choice(served: Any) -> None:
    client = served.client()
    obj = client.chat.completions.create(model=MODEL, messages=_ask('Reply with {"answer": 42}'), max_tokens=60,
                                         response_format={"type": "json_object"}, temperature=0)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    regex = client.completions.create(model=MODEL, prompt="A part number:", max_tokens=12, temperature=0,
                                      extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-[0-9]{4}"}})
    assert len(regex.choices[0].text) == 7 and regex.choices[0].text[2] == "-"
    choice = client.chat.completions.create(
        model=MODEL, messages=_ask("Is the sky green?"), max_tokens=5, temperature=1.0, n=3, seed=1,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert {c.message.content for c in choice.choices} <= {"yes", "no"}


def test_unsupported_schema_features_are_a_400_naming_them(served: Any) -> None:
    client = served.client()
    schema = {"type": "object", "properties": {"a": {"type": "integer", "not": {"const": 3}}},
              "if": {"required": ["a"]}, "then": {"required": ["a"]}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=_ask("x"), max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    message = info.value.body["message"]
    assert "#/properties/a: not" in message and "#: if" in message and "#: then" in message
    with pytest.raises(openai.BadRequestError, match="cannot be compiled"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=4,
                                  extra_body={"structured_outputs": {"grammar": "root ::= ("}})


def test_named_tool_choice_returns_a_valid_call_streamed_and_not(served: Any) -> None:
    client = served.client()
    choice = {"type": "function", "function": {"name": "get_weather"}}
    whole = client.chat.completions.create(model=MODEL, messages=_ask("Weather in Paris?"), tools=[WEATHER_TOOL],
                                           tool_choice=choice, max_tokens=40, temperature=0)
    call = whole.choices[0].message.tool_calls[0]
    assert whole.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=_ask("Weather in Rome?"), tools=[WEATHER_TOOL], tool_choice=choice, max_tokens=40,
        temperature=0, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].function.arguments == ""
    assert len(deltas) > 2  # the arguments arrive in pieces, as OpenAI streams them
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_required_tool_choice_and_tool_history(served: Any) -> None:
    client = served.client()
    first = client.chat.completions.create(
        model=MODEL, messages=_ask("What time is it in Tokyo?"), tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required", parallel_tool_calls=False, max_tokens=60, temperature=0)
    calls = first.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name in {"get_weather", "get_time"}
    schema = (WEATHER_TOOL if calls[0].function.name == "get_weather" else TIME_TOOL)["function"]["parameters"]
    jsonschema.validate(json.loads(calls[0].function.arguments), schema)
    history = [*_ask("What time is it in Tokyo?"), first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": calls[0].id, "content": "10:42"}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL, TIME_TOOL],
                                            tool_choice="none", max_tokens=12, temperature=0)
    assert second.choices[0].message.content and second.choices[0].message.tool_calls is None


def test_auto_tool_choice_parses_the_models_own_call_format(served: Any) -> None:
    # The model writes the default format's block; logit_bias cannot force that, so the prompt
    # is a completion that already opened the block, and a regex keeps the call well formed.
    client = served.client()
    regex = r'<tool_call>\n\{"name": "get_time", "arguments": \{"tz": "[A-Za-z/]{1,10}"\}\}\n</tool_call>'
    response = http_request("POST", served.base_url + "/v1/chat/completions", json_body={
        "model": MODEL, "messages": _ask("Time in Oslo? Use a tool."), "tools": [TIME_TOOL], "max_tokens": 40,
        "temperature": 0, "structured_outputs": {"regex": regex}})
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "get_time"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"])["tz"]
    assert response.json()["choices"][0]["finish_reason"] == "tool_calls"
    stream = client.chat.completions.create(model=MODEL, messages=_ask("Time in Oslo? Use a tool."),
                                            tools=[TIME_TOOL], max_tokens=40, temperature=0, stream=True,
                                            extra_body={"structured_outputs": {"regex": regex}})
    chunks = list(stream)
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_time"


def test_logit_bias_is_applied_and_validated(served: Any, tokenizer: Any) -> None:
    client = served.client()
    token = tokenizer.encode(" banana", add_special_tokens=False)[0]
    out = client.completions.create(model=MODEL, prompt="My favourite word is", max_tokens=3, temperature=0,
                                    logit_bias={str(token): 100})
    assert out.choices[0].text.startswith(" banana")
    for bad in ({str(token): 101}, {"-1": 1}, {str(len(tokenizer)): 1}, {"x": 1}):
        with pytest.raises(openai.BadRequestError, match="logit_bias"):
            client.completions.create(model=MODEL, prompt="x", max_tokens=1, logit_bias=bad)


def test_unknown_fields_and_deep_json_are_a_400(served: Any) -> None:
    response = http_request("POST", served.base_url + "/v1/chat/completions", json_body={
        "model": MODEL, "messages": _ask("x"), "max_tokens": 1, "frobnicate": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "frobnicate"
    deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = http_request("POST", served.base_url + "/v1/chat/completions", content=deep)
    assert response.status_code == 400 and "nested" in response.json()["error"]["message"]
