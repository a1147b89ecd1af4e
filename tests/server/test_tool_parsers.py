"""Each tool-call parser on output written the way the models of its format write it (text as
their tokenizers decode it with special tokens kept), and streamed through ToolStream in small
pieces: the same calls come out, and content outside the calls stays content."""

from __future__ import annotations

import json

import pytest

from appliance.server.tool_parsers import PARSERS, parser_for_template
from appliance.server.tools import ToolConfig, ToolStream

# Qwen2.5-7B-Instruct / Hermes-2-Pro: one <tool_call> block per call, JSON with "arguments".
QWEN_OUTPUT = (
    '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA", '
    '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_temperature_date", "arguments": '
    '{"location": "San Francisco, CA, USA", "date": "2024-10-01", "unit": "celsius"}}\n</tool_call>')
HERMES_WITH_TEXT = ('Let me check that for you.\n<tool_call>\n{"arguments": {"symbol": "TSLA"}, '
                    '"name": "get_stock_fundamentals"}\n</tool_call>')
# Llama-3.1-8B-Instruct (JSON tool calling, its template's default): the python tag is optional.
LLAMA_OUTPUT = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}'
LLAMA_TWO = ('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
             '{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}')
# Mistral-7B-Instruct-v0.3: [TOOL_CALLS] then a JSON list; v11+ tokenizers: name[ARGS]{...}.
MISTRAL_OUTPUT = '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, FR", "format": "celsius"}}]'
MISTRAL_V11 = '[TOOL_CALLS]get_current_weather[ARGS]{"location": "Paris, FR"}[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}'


@pytest.mark.parametrize(("parser", "text", "names", "content"), [
    ("hermes", QWEN_OUTPUT, ["get_current_temperature", "get_temperature_date"], None),
    ("hermes", HERMES_WITH_TEXT, ["get_stock_fundamentals"], "Let me check that for you."),
    ("llama3_json", LLAMA_OUTPUT, ["get_weather"], None),
    ("llama3_json", LLAMA_TWO, ["get_weather", "get_time"], None),
    ("mistral", MISTRAL_OUTPUT, ["get_current_weather"], None),
    ("mistral", MISTRAL_V11, ["get_current_weather", "get_time"], None),
])
def test_parsers_extract_calls(parser: str, text: str, names: list[str], content: str | None) -> None:
    got_content, calls = PARSERS[parser].extract(text)
    assert [c.name for c in calls] == names
    assert all(isinstance(json.loads(c.arguments), dict) for c in calls)
    assert got_content == content
    # Streamed in 3-character pieces, the calls (and only the content) come out of ToolStream.
    stream = ToolStream(ToolConfig([], "auto", None, True, PARSERS[parser], False))
    payloads = []
    for i in range(0, len(text), 3):
        payloads += stream.feed(text[i:i + 3], finished=i + 3 >= len(text))
    streamed_content = "".join(p.get("content", "") for p in payloads)
    heads = [tc for p in payloads for tc in p.get("tool_calls", []) if "id" in tc]
    arguments: dict[int, str] = {}
    for p in payloads:
        for tc in p.get("tool_calls", []):
            arguments[tc["index"]] = arguments.get(tc["index"], "") + tc["function"].get("arguments", "")
    assert [h["function"]["name"] for h in heads] == names
    assert [json.loads(arguments[k]) for k in sorted(arguments)] == [json.loads(c.arguments) for c in calls]
    assert streamed_content.strip() == (content or "")


@pytest.mark.parametrize("text", ["The weather is nice.", "<tool_call>\n{not json}\n</tool_call>", "{oops"])
def test_plain_or_malformed_text_stays_content(text: str) -> None:
    for parser in PARSERS.values():
        content, calls = parser.extract(text)
        assert calls == [] and content == text


def test_parser_chosen_from_the_template() -> None:
    assert parser_for_template("{% if tools %}<tool_call>{% endif %}").name == "hermes"
    assert parser_for_template("{{ '<|python_tag|>' }} ipython").name == "llama3_json"
    assert parser_for_template("[AVAILABLE_TOOLS] [TOOL_CALLS]").name == "mistral"
    assert parser_for_template("<|im_start|>{{ message['content'] }}").name == "hermes"  # our default format


def test_config_forces_a_parser_and_names_a_bad_one(tmp_path) -> None:
    from appliance.config import load_config
    from appliance.errors import ConfigError
    from appliance.server.tools import parse_tools

    body = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    assert parse_tools(body, "<tool_call>", "mistral").parser.name == "mistral"
    assert parse_tools(body, "<tool_call>", "auto").parser.name == "hermes"
    path = tmp_path / "appliance.toml"
    path.write_text('[server]\ntool_call_parser = "llama3_json"\n')
    assert load_config(str(path)).server.tool_call_parser == "llama3_json"
    path.write_text('[server]\ntool_call_parser = "qwen"\n')
    with pytest.raises(ConfigError, match="tool_call_parser"):
        load_config(str(path))
