"""End-to-end check: the engine's log-probabilities against Hugging Face transformers, same weights.

A batch of three requests runs through the real engine (CUDA graphs on the GPU): a long prompt
split into several chunked-prefill steps, a prompt that hits the prefix cache left by an earlier
request, and a short one; each then decodes 32 steps greedily with top-20 log-probabilities.
The same weights go into the HF model, which recomputes every position in one forward pass.

On the GPU (bf16) the tolerance is bf16's own: our error against HF in fp32 must stay within
twice HF-bf16's own error against HF-fp32 (plus 0.05 nats). On the CPU (fp32) it is 1e-3 nats.

    python -m appliance_bench.e2e_check --models llama-3.1-8b qwen2.5-7b   # GPU
    python -m appliance_bench.e2e_check --models tiny-llama tiny-qwen2     # CPU, used by tests
    python -m appliance_bench.e2e_check --models llama-3.1-8b --kv-cache-dtype fp8

With `--kv-cache-dtype fp8` the engine keeps K/V in float8 e4m3 (scales 1.0): the error against HF
fp32 is reported with a looser tolerance (bf16 bound + 0.5 nats) as `within_fp8_tolerance`, not
asserted: `ok` then only says the run completed.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from typing import Any

import torch

from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from appliance.engine.sequence import SamplingParams

DECODE_STEPS = 32
TOP_K = 20


def run_engine(model: str, device: str, dtype: str, sizes: dict[str, int],
               kv_cache_dtype: str = "auto") -> tuple[Any, dict[str, Any]]:
    from appliance.engine.llm_engine import EngineCore

    config = EngineConfig(
        model=ModelConfig(model=model, load_format="dummy", dtype=dtype, device=device, seed=1234),
        cache=CacheConfig(block_size=16, gpu_memory_utilization=0.40, cpu_kv_cache_bytes=64 << 20,
                          kv_cache_dtype=kv_cache_dtype),
        scheduler=SchedulerConfig(max_model_len=sizes["max_model_len"], max_num_seqs=16,
                                  max_num_batched_tokens=sizes["chunk"]),
    )
    engine = EngineCore(config, stream_outputs=False)  # each choice reported once, whole
    vocab = engine.vocab_size
    rng = random.Random(0)
    shared = [rng.randrange(vocab) for _ in range(sizes["shared"])]
    prompts = {
        "long": [rng.randrange(vocab) for _ in range(sizes["long"])],  # several prefill chunks
        "prefix-hit": shared + [rng.randrange(vocab) for _ in range(sizes["short"])],
        "short": [rng.randrange(vocab) for _ in range(sizes["short"])],
    }
    params = SamplingParams(max_tokens=DECODE_STEPS + 1, temperature=0.0, ignore_eos=True, logprobs=TOP_K)
    # Warm the prefix cache with the shared part, then submit the batch together.
    engine.add_request("warm", shared + [1, 2, 3], SamplingParams(max_tokens=1, temperature=0.0))
    while engine.has_unfinished_requests():
        engine.step()
    hits_before = engine.stats().prefix_cache_hits
    for name, ids in prompts.items():
        engine.add_request(name, ids, params)
    final: dict[str, Any] = {}
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    stats = engine.stats()
    facts = {
        "steps": steps,
        "prefix_cache_hit_tokens": stats.prefix_cache_hits - hits_before,
        "cached_tokens_prefix_hit_request": final["prefix-hit"].num_cached_tokens,
        "graphs_captured": sorted(engine.runner.graphs),
    }
    assert facts["cached_tokens_prefix_hit_request"] > 0, "the prefix-hit request found no cached block"
    results = {name: (prompts[name], final[name].outputs[0]) for name in prompts}
    state = {k: v.detach().to("cpu") for k, v in engine.runner.model.hf_state_dict().items()}
    hf_config = engine.resolved.hf_config
    del engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return (hf_config, state), {"results": results, **facts}


def hf_logprobs(hf_config: Any, state: dict[str, torch.Tensor], sequences: list[list[int]],
                device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    hf_config._attn_implementation = "eager" if device == "cpu" else "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    model.eval()
    out = []
    with torch.inference_mode():
        for ids in sequences:
            logits = model(torch.tensor([ids], device=device)).logits[0].float()
            out.append(torch.log_softmax(logits, dim=-1).cpu())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def check_model(model: str, device: str, kv_cache_dtype: str = "auto") -> dict[str, Any]:
    gpu = device == "cuda"
    sizes = ({"long": 600, "shared": 320, "short": 40, "chunk": 256, "max_model_len": 1024} if gpu
             else {"long": 70, "shared": 48, "short": 9, "chunk": 32, "max_model_len": 256})
    dtype = "bfloat16" if gpu else "float32"
    t0 = time.monotonic()
    (hf_config, state), run = run_engine(model, device, dtype, sizes, kv_cache_dtype)
    names = list(run["results"])
    sequences = []
    for name in names:
        prompt, choice = run["results"][name]
        sequences.append(prompt + choice.token_ids[:-1])
    ref32 = hf_logprobs(hf_config, state, sequences, device, torch.float32)
    ref16 = hf_logprobs(hf_config, state, sequences, device, torch.bfloat16) if gpu else None
    report: dict[str, Any] = {"model": model, "device": device, "dtype": dtype, "kv_cache_dtype": kv_cache_dtype,
                              **{k: v for k, v in run.items() if k != "results"}}
    worst_ours = worst_hf16 = 0.0
    for i, name in enumerate(names):
        prompt, choice = run["results"][name]
        assert len(choice.logprobs) == DECODE_STEPS + 1
        for step, lp in enumerate(choice.logprobs):
            row = len(prompt) - 1 + step
            ids = [lp.token_id] + [t for t, _ in lp.top]
            ours = torch.tensor([lp.logprob] + [v for _, v in lp.top])
            ref = ref32[i][row, ids]
            worst_ours = max(worst_ours, (ours - ref).abs().max().item())
            if ref16 is not None:
                worst_hf16 = max(worst_hf16, (ref16[i][row, ids] - ref).abs().max().item())
    tolerance = 2 * worst_hf16 + 0.05 if gpu else 1e-3
    if kv_cache_dtype == "fp8":
        # fp8 K/V (3 mantissa bits) moves logprobs by more than bf16 does: reported, not asserted.
        report["fp8_tolerance"] = tolerance + 0.5
        report["within_fp8_tolerance"] = worst_ours <= tolerance + 0.5
    report.update({
        "positions_checked": len(names) * (DECODE_STEPS + 1),
        "max_abs_logprob_err_ours_vs_hf_fp32": worst_ours,
        "max_abs_logprob_err_hf_bf16_vs_hf_fp32": worst_hf16 if gpu else None,
        "tolerance": tolerance,
        "ok": worst_ours <= tolerance or kv_cache_dtype == "fp8",
        "seconds": round(time.monotonic() - t0, 1),
    })
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "tiny-qwen2"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the reports here")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                        help="engine KV-cache dtype; fp8: the error is reported, not checked")
    args = parser.parse_args(argv)
    reports = []
    for model in args.models:
        report = check_model(model, args.device, args.kv_cache_dtype)
        print(json.dumps(report), flush=True)
        reports.append(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=2)
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
