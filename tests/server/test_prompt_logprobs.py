"""Prompt logprobs (echo + logprobs, max_tokens 0: what lm-eval's loglikelihood scoring sends):
every prompt token but the first gets the logprob the model gives it after the tokens before it,
the same figure the engine reports when it samples that token itself."""

from __future__ import annotations

import math
from typing import Any

import openai
import pytest

from tests.server.apps_server import apps_served  # noqa: F401 - the shared server fixture
from tests.server.conftest import MODEL

pytestmark = pytest.mark.parametrize("engine_and_gate", ["inline"], indirect=True)


def test_echo_scores_the_prompt_like_sampling_would(apps_served: Any, tokenizer: Any) -> None:  # noqa: F811
    client = apps_served.client()
    prompt = "The capital of France is Paris"
    ids = tokenizer.encode(prompt)
    scored = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=0, logprobs=2)
    choice = scored.choices[0]
    assert choice.text == prompt and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    # The last token's logprob, had the model sampled it after the rest (raw-logit logprobs).
    last = client.completions.create(model=MODEL, prompt=ids[:-1], max_tokens=1, logprobs=0, temperature=0,
                                     logit_bias={str(ids[-1]): 100})
    assert math.isclose(last.choices[0].logprobs.token_logprobs[0], lp.token_logprobs[-1], abs_tol=2e-3)
    # Scored again (the prompt's blocks are cached now): the same figures, every position computed.
    again = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=0, logprobs=2)
    assert again.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    # Echo with generation: the prompt's logprobs come first, then the generated tokens', streamed too.
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=2, logprobs=1,
                                              stream=True, extra_body={"ignore_eos": True}))
    values = [v for c in streamed for v in (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])]
    assert values[0] is None and len(values) == len(ids) + 2
    assert values[1:len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0)
