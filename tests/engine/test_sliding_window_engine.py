"""A sliding-window model (Mistral v0.1 style: every layer slides) through the whole engine on CPU:
chunked prefill, prefix caching, the block manager releasing blocks that left the window, and the
reference attention over tables with released (-1) entries. Greedy output equals HF transformers'
greedy decoding with the same weights token for token, and the blocks a long-running sequence holds
stay bounded by its window.

NOTE: the HF reference re-runs the whole sequence without a cache for every token. HF's `generate`
(transformers 5.24) builds its prefill's sliding mask one key narrower than its own forward does
(23 keys visible per query for sliding_window=24, against 24 in the forward, which is the Mistral
and Gemma reference implementations' window: the query itself and W - 1 before it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from appliance.engine.block_manager import FREED_BLOCK
from appliance.engine.llm_engine import EngineCore
from appliance.engine.outputs import OutputAccumulator
from appliance.engine.sequence import SamplingParams

WINDOW, BLOCK_SIZE, NEW_TOKENS = 24, 8, 96


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, sliding_window=WINDOW, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(config).eval()
    with torch.no_grad():  # HF's init is too flat for greedy ties to be rare: widen it
        for name, param in hf.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("mistral-sliding")
    hf.save_pretrained(str(path))
    return path


def test_greedy_equals_hf_and_released_blocks_bound_memory(model_dir: Path) -> None:
    engine = EngineCore(EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype="float32", device="cpu"),
        cache=CacheConfig(block_size=BLOCK_SIZE, cpu_kv_cache_bytes=8 << 20),
        scheduler=SchedulerConfig(max_model_len=512, max_num_batched_tokens=32),  # chunked prefill
    ))
    assert engine.block_manager.sliding_window == WINDOW
    gen = torch.Generator().manual_seed(1)
    prompts = {f"r{i}": torch.randint(0, 128, (n,), generator=gen).tolist() for i, n in enumerate((70, 9, 41))}
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    accumulators = {}
    for request_id, ids in prompts.items():
        engine.add_request(request_id, ids, params)
        accumulators[request_id] = OutputAccumulator(request_id, ids, keep_all=True)
    most_held_late = 0
    steps = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            accumulators[delta.request_id].add(delta)
        steps += 1
        running = engine.scheduler.running
        if steps > 20 and running:  # every prompt is long done: decoding only
            most_held_late = max(most_held_late, engine.block_manager.usage().num_used)
            assert any(FREED_BLOCK in seq.block_table for seq in running)
    # Each sequence keeps its window (ceil((24 - 1) / 8) + 1 = 4 blocks), the block being filled
    # and, with prefix caching, the newest hashed block: 6 at most, whatever its length.
    assert 0 < most_held_late <= 3 * 6

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for request_id, ids in prompts.items():
        sequence = list(ids)
        with torch.inference_mode():
            for _ in range(NEW_TOKENS):
                sequence.append(int(hf(torch.tensor([sequence])).logits[0, -1].argmax()))
        want = sequence[len(ids):]
        got = list(accumulators[request_id].output().outputs[0].token_ids)
        first_diff = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        assert got == want, f"{request_id}: diverged at token {first_diff}"
