"""The same workloads through Hugging Face transformers, in the benchmark's process and run.

`generate` runs static batches (every prompt has the same length, so no padding); `generate_batch`
is transformers' own continuous batching. The model is built from the same architecture dict as
the engine's `dummy` load format, with random weights (speed does not depend on their values).
EOS is switched off in the config so every request produces exactly its output budget.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch


def build_hf_model(architecture: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in architecture.items() if k not in ("architectures", "model_type")}
    fields["eos_token_id"] = None  # ignore EOS, as the engine's requests do
    fields.setdefault("pad_token_id", 0)
    config = AutoConfig.for_model(architecture["model_type"], **fields)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_generate_static(model: Any, prompts: list[list[int]], output_tokens: int, batch_size: int,
                       device: torch.device) -> dict[str, float]:
    """All prompts in static batches of `batch_size`; greedy; returns time and tokens."""
    generated = 0
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            ids = torch.tensor(prompts[i:i + batch_size], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_tokens,
                                 min_new_tokens=output_tokens, do_sample=False)
            generated += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    _sync(device)
    return {"time_s": time.perf_counter() - t0, "output_tokens": generated}


def hf_generate_batch(model: Any, prompts: list[list[int]], output_tokens: int,
                      device: torch.device) -> dict[str, float]:
    """transformers' continuous batching (`generate_batch`), all requests submitted at once."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=output_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    _sync(device)
    t0 = time.perf_counter()
    # NOTE: not under inference_mode: generate_batch resets its static tensors in place from its own
    # thread, which inference tensors forbid.
    with torch.no_grad():
        results = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    _sync(device)
    elapsed = time.perf_counter() - t0
    generated = sum(len(getattr(r, "generated_tokens", []) or []) for r in results.values())
    if generated < len(prompts) * output_tokens:
        raise RuntimeError(f"generate_batch produced {generated} of {len(prompts) * output_tokens} tokens "
                           f"({len(results)} of {len(prompts)} requests came back)")
    return {"time_s": elapsed, "output_tokens": generated}


def hf_decode_latency_ms(model: Any, prompt: list[int], output_tokens: int, device: torch.device) -> float:
    """Batch-1 ms per output token: (time for N tokens - time for 1 token) / (N - 1), excluding prefill."""
    ids = torch.tensor([prompt], device=device)

    def run(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)
        _sync(device)
        return time.perf_counter() - t0

    run(2)  # warm-up
    one = run(1)
    full = run(output_tokens)
    return (full - one) / max(1, output_tokens - 1) * 1e3


def run_hf(architecture: dict[str, Any], device: torch.device, dtype: torch.dtype, prompts: list[list[int]],
           output_tokens: int, latency_prompt: list[int], latency_output_tokens: int, modes: list[str],
           batch_size: int, results: dict[str, Any], checkpoint: Callable[[], None]) -> None:
    """Every HF measurement for one model, into `results`; `checkpoint()` after each, so a run cut
    short by a time limit keeps what it measured. Errors are recorded, not raised (HF APIs move)."""
    model = build_hf_model(architecture, device, dtype)
    try:
        for mode in modes:
            try:
                if mode == "generate":
                    results["generate"] = hf_generate_static(model, prompts, output_tokens, batch_size, device)
                    results["generate"]["batch_size"] = batch_size
                    results["decode_ms_per_token"] = hf_decode_latency_ms(model, latency_prompt,
                                                                          latency_output_tokens, device)
                elif mode == "generate_batch":
                    results["generate_batch"] = hf_generate_batch(model, prompts, output_tokens, device)
            except Exception as exc:  # noqa: BLE001 - a baseline failing must not lose the engine's numbers
                results[f"{mode}_error"] = f"{type(exc).__name__}: {exc}"[:500]
            checkpoint()
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
