"""The offline API for Python users: `LLM().generate(...)`, and vLLM-style flat engine arguments."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from appliance.engine.llm_engine import EngineCore
from appliance.engine.outputs import OutputAccumulator, RequestOutput
from appliance.engine.sequence import SamplingParams


def engine_config_from_kwargs(model: str = "default", **kwargs: Any) -> EngineConfig:
    """vLLM-style flat keyword arguments (max_model_len=..., block_size=...) → EngineConfig."""
    sections: dict[type, dict[str, Any]] = {ModelConfig: {"model": model}, CacheConfig: {}, SchedulerConfig: {}}
    top: dict[str, Any] = {}
    for key, value in kwargs.items():
        for cls, values in sections.items():
            if key in cls.__dataclass_fields__:
                values[key] = value
                break
        else:
            if key in EngineConfig.__dataclass_fields__:
                top[key] = value
            else:
                raise TypeError(f"unknown engine argument {key!r}")
    return replace(EngineConfig(), model=ModelConfig(**sections[ModelConfig]),
                   cache=CacheConfig(**sections[CacheConfig]),
                   scheduler=SchedulerConfig(**sections[SchedulerConfig]), **top)


class LLM:
    """Offline generation for Python users: `LLM().generate(["Hello"], SamplingParams(...))`."""

    def __init__(self, model: str = "default", **engine_kwargs: Any) -> None:
        self.engine = EngineCore(engine_config_from_kwargs(model, **engine_kwargs), stream_outputs=False)
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        return list(prompt)

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        accumulators = []
        for prompt, p in zip(prompts, plist, strict=True):
            request_id = f"offline-{self._counter}"
            self._counter += 1
            ids = self._encode(prompt)  # type: ignore[arg-type]
            self.engine.add_request(request_id, ids, p)
            accumulators.append(OutputAccumulator(request_id, ids, keep_all=True))
        return self._run(accumulators)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             params: SamplingParams | None = None) -> list[RequestOutput]:
        from appliance.models.tokenizer import apply_chat_template

        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [apply_chat_template(self.tokenizer, conv) for conv in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params)

    def _run(self, accumulators: list[OutputAccumulator]) -> list[RequestOutput]:
        """Step until every request finished, merging the core's deltas (the engine reports
        each choice once, whole, in this mode: stream_outputs=False)."""
        by_id = {acc.request_id: acc for acc in accumulators}
        pending = len(by_id)
        while pending:
            for delta in self.engine.step():
                acc = by_id[delta.request_id]
                acc.add(delta)
                if delta.finished:
                    pending -= 1
        return [acc.output() for acc in accumulators]
