"""The engine against Hugging Face transformers on the real default model (fp32, CPU)."""

from __future__ import annotations

import torch

from appliance.engine.sequence import SamplingParams

from .conftest import CHAT_PROMPTS, chat_ids, run_to_completion


def hf_greedy(hf_model, ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                                eos_token_id=eos_ids, pad_token_id=eos_ids[0])
    tokens = out[0, len(ids):].tolist()
    # HF pads finished rows with pad ids only in batches; alone, it stops at the EOS it emits.
    return tokens


def test_greedy_matches_hf_generate_token_for_token(engine, hf_model):
    params = SamplingParams(max_tokens=64, temperature=0.0)
    prompts = {f"hf-{i}": (chat_ids(engine.tokenizer, p), params) for i, p in enumerate(CHAT_PROMPTS)}
    lengths = {len(ids) for ids, _ in prompts.values()}
    assert len(lengths) >= 6, "prompts should have different lengths"
    outputs = run_to_completion(engine, prompts)  # all 8 submitted together: one batch
    for request_id, (ids, _) in prompts.items():
        ours = outputs[request_id].outputs[0].token_ids
        theirs = hf_greedy(hf_model, ids, 64, engine.eos_token_ids)
        first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                          min(len(ours), len(theirs)))
        assert ours == theirs, f"{request_id}: diverged at {first_diff}"
        text = outputs[request_id].outputs[0].text
        assert text == engine.tokenizer.decode(ours, skip_special_tokens=True)


def test_alone_equals_inside_batch_of_32(engine):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    target = chat_ids(engine.tokenizer, "Tell me a short story about a robot.")
    alone = run_to_completion(engine, {"alone": (target, params)})["alone"].outputs[0].token_ids
    batch = {f"b{i}": (chat_ids(engine.tokenizer, f"Question {i}: what is {i} times {i + 3}?"), params)
             for i in range(31)}
    batch["target"] = (target, params)
    together = run_to_completion(engine, batch)["target"].outputs[0].token_ids
    assert alone == together


def test_logprobs_equal_log_softmax_of_hf_logits(engine, hf_model):
    ids = chat_ids(engine.tokenizer, "Count from one to five.")
    out = run_to_completion(engine, {"lp": (ids, SamplingParams(max_tokens=6, temperature=0.0, logprobs=5))})
    choice = out["lp"].outputs[0]
    full = torch.tensor([ids + choice.token_ids])
    with torch.inference_mode():
        logits = hf_model(full).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    for step, lp in enumerate(choice.logprobs):
        row = ref[len(ids) - 1 + step]
        assert lp.token_id == choice.token_ids[step]
        assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
        top_vals, top_ids = row.topk(5)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        for (_, value), expected in zip(lp.top, top_vals.tolist(), strict=True):
            assert abs(value - expected) < 1e-4
