"""What a request constrains its output to: a `GrammarSpec`, parsed and checked at the HTTP edge.

Sources (OpenAI and vLLM request fields):
- `response_format`: {"type": "text"} (none), {"type": "json_object"} (any JSON object),
  {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}};
- vLLM's `structured_outputs`: exactly one of `json` (a schema), `regex`, `choice` (a list of
  strings), `grammar` (EBNF, as xgrammar/GBNF read it), `json_object` (true);
- forced tool calls (tool_choice "required" or a named function): built by server/tools.py.

A schema keyword we cannot enforce is a 400 that names it and where it is, never silently
dropped: `SUPPORTED_SCHEMA_KEYWORDS` is the list of what the grammar compiler enforces, plus
annotations. `check_compiles` runs the compiler's schema/regex/EBNF front end (no tokenizer,
sub-millisecond) so a malformed grammar is a 400 too, before the request reaches the engine.

No torch or xgrammar at import: SamplingParams carries a GrammarSpec into the engine (and
across the pipe to an engine process), and the server imports this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from appliance.errors import InvalidRequestError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")

# What xgrammar's JSON-schema converter enforces (checked against 0.2.9).
_ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
    "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "minimum",
    "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern", "format",
    "patternProperties", "minProperties", "maxProperties",
})
# Annotations: they constrain nothing, so there is nothing to enforce.
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "discriminator", "contentMediaType", "contentEncoding", "$anchor",
})
SUPPORTED_SCHEMA_KEYWORDS = _ENFORCED | _ANNOTATIONS
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAX_SCHEMA_DEPTH = 64
_MAX_CHOICES = 1024


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint, hashable (the compile cache's key) and picklable (the engine process).

    kind: one of KINDS. source: the text the compiler reads: a JSON schema (key order kept)
    (json_schema), a regex, a JSON list of strings (choice), EBNF (grammar), "" (json_object).
    """

    kind: str
    source: str

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind


def _bad(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"'{param}' {message}", param=param)


def unsupported_schema_keywords(schema: Any, path: str = "#", depth: int = 0) -> list[str]:
    """Every keyword of `schema` the grammar cannot enforce, as 'path: keyword' (empty: all fine)."""
    if isinstance(schema, bool):
        return []
    if not isinstance(schema, dict):
        return [f"{path}: a schema must be an object or a boolean"]
    if depth > _MAX_SCHEMA_DEPTH:
        return [f"{path}: nested deeper than {_MAX_SCHEMA_DEPTH} levels"]
    found = [f"{path}: {key}" for key in schema if key not in SUPPORTED_SCHEMA_KEYWORDS]
    ref = schema.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
        found.append(f"{path}: $ref to {ref!r} (only local references, '#/...')")
    for key in _SUBSCHEMA_MAPS:
        sub = schema.get(key)
        if isinstance(sub, dict):
            for name, value in sub.items():
                found += unsupported_schema_keywords(value, f"{path}/{key}/{name}", depth + 1)
    for key in _SUBSCHEMA_LISTS:
        sub = schema.get(key)
        if isinstance(sub, list):
            for i, value in enumerate(sub):
                found += unsupported_schema_keywords(value, f"{path}/{key}/{i}", depth + 1)
    for key in ("items", "additionalProperties"):
        sub = schema.get(key)
        if isinstance(sub, dict):
            found += unsupported_schema_keywords(sub, f"{path}/{key}", depth + 1)
    return found


def json_schema_spec(schema: Any, param: str) -> GrammarSpec:
    """A checked json_schema spec; 400 naming `param` and every unsupported keyword."""
    if not isinstance(schema, dict):
        raise _bad(param, "must be a JSON schema object")
    problems = unsupported_schema_keywords(schema)
    if problems:
        shown = "; ".join(problems[:10]) + ("; …" if len(problems) > 10 else "")
        raise _bad(param, f"uses JSON-schema features that constrained decoding cannot enforce: {shown}")
    # NOTE: key order kept: the grammar emits properties in the schema's order (pydantic's field order).
    spec = GrammarSpec("json_schema", json.dumps(schema, ensure_ascii=False))
    check_compiles(spec, param)
    return spec


def parse_response_format(value: Any) -> GrammarSpec | None:
    """OpenAI's `response_format`."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _bad("response_format", "must be an object with a 'type'")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", "")
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict):
            raise _bad("response_format.json_schema", "must be an object with 'name' and 'schema'")
        unknown = set(inner) - {"name", "schema", "strict", "description"}
        if unknown:
            raise _bad("response_format.json_schema", f"has unsupported fields: {sorted(unknown)}")
        schema = inner.get("schema")
        if schema is None:  # OpenAI allows it: any JSON object
            return GrammarSpec("json_object", "")
        return json_schema_spec(schema, "response_format.json_schema.schema")
    raise _bad("response_format.type", f"must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def parse_structured_outputs(value: Any) -> GrammarSpec | None:
    """vLLM's `structured_outputs` extra: exactly one of json, regex, choice, grammar, json_object."""
    if value is None:
        return None
    param = "structured_outputs"
    if not isinstance(value, dict):
        raise _bad(param, "must be an object")
    kinds = ("json", "regex", "choice", "grammar", "json_object")
    unknown = sorted(set(value) - set(kinds))
    if unknown:
        raise _bad(param, f"has fields this server does not implement: {unknown} (supported: {list(kinds)})")
    given = [k for k in kinds if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise _bad(param, f"must set exactly one of {list(kinds)}")
    kind = given[0]
    item = value[kind]
    if kind == "json":
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except ValueError:
                raise _bad(f"{param}.json", "must be a JSON schema (an object or its JSON text)") from None
        return json_schema_spec(item, f"{param}.json")
    if kind == "json_object":
        if item is not True:
            raise _bad(f"{param}.json_object", "must be true")
        return GrammarSpec("json_object", "")
    if kind == "choice":
        if (not isinstance(item, list) or not item or len(item) > _MAX_CHOICES
                or not all(isinstance(c, str) and c for c in item)):
            raise _bad(f"{param}.choice", f"must be a list of 1 to {_MAX_CHOICES} non-empty strings")
        spec = GrammarSpec("choice", json.dumps(item, ensure_ascii=False))
    else:
        if not isinstance(item, str) or not item:
            raise _bad(f"{param}.{kind}", "must be a non-empty string")
        spec = GrammarSpec(kind, item)
    check_compiles(spec, f"{param}.{kind}")
    return spec


def choice_regex(choices: list[str]) -> str:
    """A regex matching exactly one of `choices` (literal text, metacharacters escaped)."""
    import re

    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def check_compiles(spec: GrammarSpec, param: str) -> None:
    """Run the grammar front end (no tokenizer): a spec it rejects is a 400 naming `param`."""
    import xgrammar as xgr

    try:
        if spec.kind == "json_schema":
            xgr.Grammar.from_json_schema(spec.source, any_whitespace=False, strict_mode=True)
        elif spec.kind == "regex":
            xgr.Grammar.from_regex(spec.source)
        elif spec.kind == "choice":
            xgr.Grammar.from_regex(choice_regex(json.loads(spec.source)))
        elif spec.kind == "grammar":
            xgr.Grammar.from_ebnf(spec.source)
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the parser's message
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise _bad(param, f"cannot be compiled: {message}") from None
