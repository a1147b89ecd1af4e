"""What app frameworks need, through the real libraries against the default model: the Responses
API through the SDK (streamed and not), langchain-openai, instructor, openai-agents, and vLLM's
/tokenize, /detokenize, /version. Every structured answer validates against its schema."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.server.apps_server import apps_served  # noqa: F401 - the shared server fixture
from tests.server.conftest import MODEL, http_request

# the libraries see one HTTP API: the in-process engine is enough.
INLINE_ONLY = pytest.mark.parametrize("engine_and_gate", ["inline"], indirect=True)
pytestmark = [INLINE_ONLY]


class City(BaseModel):
    name: str = Field(max_length=12)
    country: str = Field(max_length=12)
    size: Literal["small", "big"]


CITY_SCHEMA = City.model_json_schema()


@pytest.fixture
def served(apps_served: Any) -> Any:  # noqa: F811 - the imported fixture
    return apps_served


def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"sunny in {city}"


def test_responses_api_text_and_json_schema_not_streamed(served: Any) -> None:
    client = served.client()
    response = client.responses.create(model=MODEL, input="Say hello.", instructions="Be brief.",
                                       max_output_tokens=8, temperature=0)
    assert response.output_text and response.usage.output_tokens > 0
    parsed = client.responses.parse(model=MODEL, input="A city in France.", text_format=City, max_output_tokens=40,
                                    temperature=0)
    assert isinstance(parsed.output_parsed, City)
    jsonschema.validate(json.loads(parsed.output_text), CITY_SCHEMA)


def test_responses_api_streamed_text_and_function_call(served: Any) -> None:
    client = served.client()
    events = list(client.responses.create(model=MODEL, input="Count to three.", max_output_tokens=10,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds and kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    tool = {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}, "strict": True}
    with client.responses.stream(model=MODEL, input="Weather in Paris?", tools=[tool], max_output_tokens=30,
                                 tool_choice={"type": "function", "name": "get_weather"}, temperature=0) as stream:
        final = stream.get_final_response()
    call = next(item for item in final.output if item.type == "function_call")
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), tool["parameters"])


def test_langchain_structured_output_and_forced_tool(served: Any) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=served.base_url + "/v1", api_key="none", temperature=0, max_tokens=48,
                     max_retries=0)
    for method in ("json_schema", "function_calling"):
        city = llm.with_structured_output(City, method=method).invoke("Name a city in Spain.")
        assert isinstance(city, City), method
    answer = llm.with_structured_output(None, method="json_mode").invoke('Reply with {"ok": true} as JSON.')
    assert isinstance(answer, dict)
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    message = bound.invoke("What is the weather in Lima?")
    assert message.tool_calls[0]["name"] == "get_weather" and isinstance(message.tool_calls[0]["args"]["city"], str)


def test_instructor_json_and_tools_modes(served: Any) -> None:
    import instructor

    for mode in (instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS):
        client = instructor.from_openai(served.client(), mode=mode)
        city = client.chat.completions.create(model=MODEL, response_model=City, max_retries=0, max_tokens=48,
                                              temperature=0, messages=[{"role": "user", "content": "A city in Peru."}])
        assert isinstance(city, City), mode
        jsonschema.validate(city.model_dump(), CITY_SCHEMA)


def test_openai_agents_with_a_function_tool_and_an_output_type(served: Any) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    model = OpenAIChatCompletionsModel(model=MODEL, openai_client=served.async_client())
    settings = ModelSettings(temperature=0, max_tokens=40)
    calls: list[str] = []

    @function_tool
    def weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    tool_agent = Agent(name="w", instructions="Use the weather tool.", tools=[weather], model=model,
                       model_settings=ModelSettings(temperature=0, max_tokens=40, tool_choice="weather"),
                       reset_tool_choice=True)
    typed = Agent(name="c", instructions="Answer with a city.", output_type=City, model=model, model_settings=settings)

    async def both() -> Any:  # one event loop: the async client's connections belong to it
        await Runner.run(tool_agent, "Weather in Quito?", max_turns=3)
        return await Runner.run(typed, "A city in Chile.", max_turns=1)

    result = asyncio.run(both())
    assert calls and isinstance(calls[0], str)
    assert isinstance(result.final_output, City)


def test_tokenize_detokenize_version(served: Any, tokenizer: Any) -> None:
    base = served.base_url
    out = http_request("POST", base + "/tokenize", json_body={"prompt": "Hello world", "return_token_strs": True})
    assert out.status_code == 200
    body = out.json()
    assert body["tokens"] == tokenizer.encode("Hello world") and body["count"] == len(body["tokens"])
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"]) and body["max_model_len"] > 0
    chat = http_request("POST", base + "/tokenize", json_body={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > body["count"]
    back = http_request("POST", base + "/detokenize", json_body={"tokens": body["tokens"]}).json()
    assert back["prompt"] == "Hello world"
    assert http_request("POST", base + "/detokenize", json_body={"tokens": [-1]}).status_code == 400
    assert http_request("GET", base + "/version").json()["version"]
