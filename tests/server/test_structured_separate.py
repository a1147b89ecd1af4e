"""Constrained decoding through the engine in its own process (engine.process = "separate"): the
grammar state lives in the child's EngineCore, the GrammarSpec crosses the pipe in SamplingParams.
One request per kind of constraint (test_structured_outputs.py covers the rest in-process)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tests.server.apps_server import apps_served  # noqa: F401 - the shared server fixture
from tests.server.conftest import MODEL
from tests.server.test_structured_outputs import WEATHER_TOOL, Person

pytestmark = pytest.mark.parametrize("engine_and_gate", ["separate"], indirect=True)


def test_schema_tool_and_choice_through_the_engine_process(apps_served: Any) -> None:  # noqa: F811
    client = apps_served.client()
    parsed = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Invent a person."}],
                                           response_format=Person, max_tokens=48, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=40, temperature=0,
        stream=True))
    arguments = "".join(tc.function.arguments or "" for c in chunks if c.choices
                        for tc in (c.choices[0].delta.tool_calls or []))
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])
    choice = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is the sky green?"}], max_tokens=5, temperature=1.0, n=3,
        seed=1, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert {c.message.content for c in choice.choices} <= {"yes", "no"}
