"""Engine fixtures: the real default model (SmolLM2-135M-Instruct) on CPU in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Hi",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering by name.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish and German.",
    "You are given the sequence 2, 4, 8, 16. What comes next, and why? Answer briefly but show the rule.",
    "Name a famous painting by Leonardo da Vinci.",
]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from appliance.models.fetch import ensure_default_model

    return ensure_default_model(progress=False)


def engine_config(model_dir: Path, **overrides: object) -> EngineConfig:
    cache = {k: overrides.pop(k) for k in list(overrides) if k in CacheConfig.__dataclass_fields__}
    sched = {k: overrides.pop(k) for k in list(overrides) if k in SchedulerConfig.__dataclass_fields__}
    assert not overrides, overrides
    return EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype="float32", device="cpu"),
        cache=CacheConfig(**{"cpu_kv_cache_bytes": 256 << 20, **cache}),
        scheduler=SchedulerConfig(**{"max_model_len": 2048, **sched}),
    )


@pytest.fixture(scope="session")
def engine(default_model_dir: Path):
    from appliance.engine.llm_engine import EngineCore

    return EngineCore(engine_config(default_model_dir))


@pytest.fixture(scope="session")
def hf_model(default_model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    model.eval()
    return model


def chat_ids(tokenizer, text: str) -> list[int]:
    from appliance.models.tokenizer import apply_chat_template

    return apply_chat_template(tokenizer, [{"role": "user", "content": text}])


def run_to_completion(engine, requests: dict[str, tuple[list[int], object]]) -> dict[str, object]:
    """Submit every request, step until all finish, return request_id -> final RequestOutput
    (the core's deltas merged by the front end's accumulator)."""
    from appliance.engine.outputs import OutputAccumulator

    accumulators = {}
    for request_id, (ids, params) in requests.items():
        engine.add_request(request_id, ids, params)
        accumulators[request_id] = OutputAccumulator(request_id, ids, keep_all=True)
    final = {}
    while len(final) < len(requests):
        for delta in engine.step():
            acc = accumulators[delta.request_id]
            acc.add(delta)
            if delta.finished:
                final[delta.request_id] = acc.output()
    return final
