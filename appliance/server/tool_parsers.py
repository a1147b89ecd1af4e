"""Tool-call formats models write, turned into OpenAI `tool_calls`.

- `hermes`: Hermes / Qwen 2.5+ / the default for templates without tool support:
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call.
- `llama3_json`: Llama 3.1+: an optional `<|python_tag|>`, then `{"name": ..., "parameters": {...}}`
  objects (several separated by `;`).
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the v11+ form
  `[TOOL_CALLS]name[ARGS]{...}` (repeated).

`parser_for_template(template)` picks one from the chat template's text. Each parser's
`extract(text)` returns the text outside the calls (None when empty) and the calls; `start`
is the marker whose appearance in a stream means "a call is being written" (server/tools.py
holds the text back from there on).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object


def _call(obj: Any, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class HermesParser:
    name = "hermes"
    start = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.start not in text:
            return text or None, []
        calls = []
        for body in self._BLOCK.findall(text):
            try:
                call = _call(json.loads(body), "arguments")
            except ValueError:
                call = None
            if call is None:
                return text or None, []  # not a well-formed call: the text is the answer
            calls.append(call)
        content = self._BLOCK.sub("", text).strip()
        return content or None, calls


class Llama3JsonParser:
    name = "llama3_json"
    start = "<|python_tag|>"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.split(self.start, 1)[1] if self.start in text else text
        stripped = body.strip()
        if not stripped.startswith("{"):
            return text or None, []
        calls = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(stripped):
            try:
                obj, end = decoder.raw_decode(stripped, pos)
            except ValueError:
                return text or None, []
            call = _call(obj, "parameters")
            if call is None:
                return text or None, []
            calls.append(call)
            pos = end
            while pos < len(stripped) and stripped[pos] in " \n\t;":
                pos += 1
        return None, calls


class MistralParser:
    name = "mistral"
    start = "[TOOL_CALLS]"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.start not in text:
            return text or None, []
        content, rest = text.split(self.start, 1)
        calls: list[ToolCall] = []
        rest = rest.strip()
        if rest.startswith("["):
            try:
                items = json.loads(rest)
            except ValueError:
                return text or None, []
            for item in items if isinstance(items, list) else []:
                call = _call(item, "arguments")
                if call is None:
                    return text or None, []
                calls.append(call)
        else:  # v11+: name[ARGS]{json}, repeated with [TOOL_CALLS] between calls
            for part in rest.split(self.start):
                if "[ARGS]" not in part:
                    return text or None, []
                name, args = part.split("[ARGS]", 1)
                try:
                    call = _call({"name": name.strip(), "arguments": json.loads(args)}, "arguments")
                except ValueError:
                    return text or None, []
                if call is None:
                    return text or None, []
                calls.append(call)
        if not calls:
            return text or None, []
        return content.strip() or None, calls


PARSERS: dict[str, Any] = {p.name: p for p in (HermesParser(), Llama3JsonParser(), MistralParser())}


def template_renders_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template  # type: ignore[operator]


def parser_for_template(template: str | None) -> Any:
    """The parser for the format the chat template teaches; `hermes` (our default format) else."""
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return PARSERS["mistral"]
    if "<tool_call>" in text:
        return PARSERS["hermes"]
    if "<|python_tag|>" in text or "ipython" in text:
        return PARSERS["llama3_json"]
    return PARSERS["hermes"]
