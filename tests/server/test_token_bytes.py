"""Tokens that hold part of a character: logprobs carry the token's own bytes, and an output cut
inside a character (max_tokens) ends before it, never in U+FFFD, streamed or not."""

from __future__ import annotations

from typing import Any

import pytest

from tests.server.apps_server import apps_served  # noqa: F401 - the shared server fixture
from tests.server.conftest import MODEL

# the front end's bookkeeping: the in-process engine is enough.
INLINE_ONLY = pytest.mark.parametrize("engine_and_gate", ["inline"], indirect=True)


@INLINE_ONLY
def test_partial_character_bytes_and_no_trailing_replacement_char(apps_served: Any, tokenizer: Any) -> None:  # noqa: F811
    first, second = tokenizer.encode("🙂", add_special_tokens=False)[:2]
    assert "\ufffd" in tokenizer.decode([first])  # the premise: a token holding part of the emoji
    client = apps_served.client()
    forced = {"logit_bias": {str(first): 100}, "max_tokens": 1, "temperature": 0}
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Smile"}],
                                           logprobs=True, top_logprobs=2, **forced)
    entry = whole.choices[0].logprobs.content[0]
    assert bytes(entry.bytes) == "🙂".encode()[: len(entry.bytes)]
    assert whole.choices[0].message.content == "" and whole.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Smile"}],
                                                 stream=True, **forced))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).endswith("\ufffd")
    both = client.completions.create(model=MODEL, prompt="Smile:", logit_bias={str(first): 100, str(second): 100},
                                     max_tokens=2, temperature=0, logprobs=1)
    assert both.choices[0].text.endswith("🙂")


def test_openapi_describes_every_accepted_field() -> None:
    from appliance.server import routes_responses, routes_tokens, schema
    from appliance.server.openapi import openapi_document

    paths = openapi_document()["paths"]

    def props(path: str) -> set[str]:
        return set(paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"])

    assert schema.CHAT_FIELDS <= props("/v1/chat/completions"), schema.CHAT_FIELDS - props("/v1/chat/completions")
    assert schema.COMPLETION_FIELDS <= props("/v1/completions"), schema.COMPLETION_FIELDS - props("/v1/completions")
    assert routes_responses._FIELDS <= props("/v1/responses"), routes_responses._FIELDS - props("/v1/responses")
    assert routes_tokens._TOKENIZE_FIELDS <= props("/tokenize")
    assert {"/detokenize", "/version"} <= set(paths)
