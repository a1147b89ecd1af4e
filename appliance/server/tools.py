"""Tool calling for chat requests: `tools`, `tool_choice`, `parallel_tool_calls`, tool history.

How a request's tools reach the model and come back:
- the prompt: a chat template that renders tools (its text mentions `tools`) gets them as
  `tools=` with the history's tool calls/results in its own message shape; any other template
  gets our documented default format (DEFAULT_FORMAT_DOC: the tools in a system message, calls
  written as Hermes `<tool_call>` blocks, results sent back as `<tool_response>` user turns);
- `tool_choice` "required" or a named function: the output is forced by a grammar (so even the
  135M default model returns valid calls): the arguments object of the named function, or a
  JSON array of {"name", "arguments"} of one of the tools (one item unless parallel_tool_calls);
- `auto`: the model decides; its text goes through the format's parser (tool_parsers.py);
- `none`: no tools are shown and nothing is parsed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from appliance.errors import InvalidRequestError
from appliance.server.tool_parsers import PARSERS, ToolCall, parser_for_template, template_renders_tools
from appliance.structured.spec import GrammarSpec, json_schema_spec

DEFAULT_FORMAT_DOC = (
    "You can call functions. Their JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call functions, reply with one block per call and nothing else, each block exactly:\n"
    '<tool_call>\n{{"name": <function name>, "arguments": <the arguments as a JSON object>}}\n</tool_call>'
)


def _bad(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"'{param}' {message}", param=param)


@dataclass
class ToolConfig:
    tools: list[dict[str, Any]]  # OpenAI chat tools, validated: {"type": "function", "function": {...}}
    choice: str  # "auto", "none", "required" or "named"
    named: str | None  # the function tool_choice names
    parallel: bool
    parser: Any  # tool_parsers.*Parser
    template_renders: bool  # the chat template renders tools itself

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    @property
    def active(self) -> bool:
        return self.choice != "none" and bool(self.tools)

    def function(self, name: str) -> dict[str, Any]:
        return next(t["function"] for t in self.tools if t["function"]["name"] == name)


def parse_tools(body: dict[str, Any], chat_template: str | None, parser: str = "auto") -> ToolConfig | None:
    """parser: server.tool_call_parser ("auto": from the template)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise _bad("tool_choice", "needs 'tools'")
        return None
    if not isinstance(tools, list):
        raise _bad("tools", "must be a list of function tools")
    names: list[str] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise _bad(f"tools[{i}]", "must be {'type': 'function', 'function': {...}} (only function tools)")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"tools[{i}].function.name", "must be a non-empty string")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _bad(f"tools[{i}].function.parameters", "must be a JSON schema object")
        names.append(fn["name"])
    if len(set(names)) != len(names):
        raise _bad("tools", "must not repeat a function name")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise _bad("parallel_tool_calls", "must be a boolean")
    named = None
    if choice is None:
        choice = "auto" if tools else "none"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad("tool_choice", "must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}")
        if fn["name"] not in names:
            raise _bad("tool_choice.function.name", f"names no tool in 'tools': {fn['name']!r}")
        choice, named = "named", fn["name"]
    elif choice not in ("auto", "none", "required"):
        raise _bad("tool_choice", f"must be 'auto', 'none', 'required' or a function, got {choice!r}")
    if choice in ("required", "named") and not tools:
        raise _bad("tool_choice", "needs at least one tool")
    return ToolConfig(tools, choice, named, parallel,
                      parser_for_template(chat_template) if parser == "auto" else PARSERS[parser],
                      template_renders_tools(chat_template))


def forced_spec(config: ToolConfig) -> GrammarSpec | None:
    """The grammar that forces the call(s), for 'required' and a named function."""
    if config.choice == "named":
        assert config.named is not None
        index = next(i for i, t in enumerate(config.tools) if t["function"]["name"] == config.named)
        params = config.function(config.named).get("parameters") or {"type": "object"}
        return json_schema_spec(params, f"tools[{index}].function.parameters")
    if config.choice == "required":
        variants = []
        for tool in config.tools:
            fn = tool["function"]
            variants.append({"type": "object", "properties": {
                "name": {"const": fn["name"]}, "arguments": fn.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False})
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
        if not config.parallel:
            schema["maxItems"] = 1
        return json_schema_spec(schema, "tools")
    return None


def _arguments_object(arguments: Any, param: str) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise _bad(param, "must be a JSON object (as text)")
    return value


def template_messages(messages: list[dict[str, Any]], config: ToolConfig | None) -> tuple[list[dict[str, Any]],
                                                                                           list[dict[str, Any]] | None]:
    """(messages for the chat template, `tools=` for it or None), in the template's format or ours."""
    renders = config is not None and config.template_renders
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message["role"]
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            parsed = [(c["function"]["name"], _arguments_object(c["function"].get("arguments", "{}"),
                                                                f"messages[{i}].tool_calls[{k}].function.arguments"),
                       c.get("id")) for k, c in enumerate(calls)]
            if renders:
                out.append({"role": "assistant", "content": message["content"], "tool_calls": [
                    {"type": "function", "id": cid, "function": {"name": name, "arguments": args}}
                    for name, args, cid in parsed]})
            else:
                blocks = "\n".join("<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
                                   + "\n</tool_call>" for name, args, _ in parsed)
                text = (message["content"] + "\n" if message["content"] else "") + blocks
                out.append({"role": "assistant", "content": text})
        elif role == "tool":
            if renders:
                out.append({"role": "tool", "content": message["content"],
                            "tool_call_id": message.get("tool_call_id")})
            else:
                out.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            out.append({"role": role, "content": message["content"]})
    if config is None or not config.active:
        return out, None
    if renders:
        return out, config.tools
    doc = DEFAULT_FORMAT_DOC.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False)
                                                    for t in config.tools))
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + doc}
    else:
        out.insert(0, {"role": "system", "content": doc})
    return out, None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def extract_calls(config: ToolConfig, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished choice."""
    if config.choice == "named":
        assert config.named is not None
        try:
            args = json.loads(text)
        except ValueError:
            return text or None, []  # cut by max_tokens: not a call
        return None, [ToolCall(config.named, json.dumps(args, ensure_ascii=False))]
    if config.choice == "required":
        try:
            items = json.loads(text)
        except ValueError:
            return text or None, []
        return None, [ToolCall(item["name"], json.dumps(item["arguments"], ensure_ascii=False)) for item in items]
    return config.parser.extract(text)


def call_dicts(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]


class ToolStream:
    """One streamed choice: text deltas in, chat `delta` payloads out (content or tool_calls).

    named: the generated text IS the arguments, streamed as argument deltas behind a first delta
    that carries the call's id and name (as OpenAI streams them). required / auto: the calls are
    sent when the choice finishes (auto streams content until the format's start marker).
    """

    def __init__(self, config: ToolConfig) -> None:
        self.config = config
        self.text = ""
        self._sent_content = 0  # auto: characters of `text` already sent as content
        self._in_call = False
        self._opened = False
        self.num_calls = 0

    def feed(self, delta: str, finished: bool) -> list[dict[str, Any]]:
        self.text += delta
        out: list[dict[str, Any]] = []
        config = self.config
        if config.choice == "named":
            if not self._opened:
                self._opened = True
                self.num_calls = 1
                out.append({"tool_calls": [{"index": 0, "id": new_call_id(), "type": "function",
                                            "function": {"name": config.named, "arguments": ""}}]})
            if delta:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": delta}}]})
            return out
        if config.choice == "auto" and not self._in_call:
            marker = config.parser.start
            at = self.text.find(marker)
            if at < 0 and config.parser.name == "llama3_json" and self.text.lstrip().startswith("{"):
                at = len(self.text) - len(self.text.lstrip())
            if at >= 0:
                self._in_call = True
                end = at
            else:
                end = len(self.text) if finished else len(self.text) - _partial_prefix(self.text, marker)
                if config.parser.name == "llama3_json" and not self.text.strip():
                    end = self._sent_content  # a call may still start with "{"
            if end > self._sent_content:
                out.append({"content": self.text[self._sent_content:end]})
                self._sent_content = end
        if finished and (self._in_call or config.choice == "required"):
            content, calls = extract_calls(config, self.text[self._sent_content:])
            if not calls:
                rest = self.text[self._sent_content:]
                if rest:
                    out.append({"content": rest})
            for k, call in enumerate(calls):
                out.append({"tool_calls": [{"index": k, "id": new_call_id(), "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
                out.append({"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]})
            self.num_calls = len(calls)
        return out


def _partial_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that begins `marker` (held back while streaming)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
