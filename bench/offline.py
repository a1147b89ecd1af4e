"""`llm-appliance bench offline`: workload W1 through the engine and through HF transformers.

W1: 512 requests x 512 random prompt tokens -> 256 output tokens, EOS ignored, all submitted at
once; on the `dummy` Llama-3.1-8B shape (bf16) and the SmolLM2-135M shape. Also batch-1 decode
latency (prompt 256, 128 new tokens) and engine start-up to the first token (model load, KV sizing
and CUDA graph capture included). HF `generate` (static batches) and `generate_batch` (continuous
batching) run the same workloads in the same process; `--no-hf` leaves them out while iterating.

The roofline ratio is measured time against a floor counted from the model's shape: FLOPs over the
bf16 matmul rate and bytes over the copy bandwidth, both measured in this run (bench/roofline.py).
Results: a table on stdout and JSON in bench/results/<date>-<device>-<commit>-offline.json.
`--smoke` runs tiny sizes on CPU so CI keeps the script working.
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SMOKE_MODEL = "tiny-llama"
HF_MODES_DEFAULT = "generate,generate_batch"


def add_arguments_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=["offline"], help="which benchmark (offline: workload W1)")
    parser.add_argument("--models", default="smollm2-135m,llama-3.1-8b",
                        help="comma-separated dummy architectures (default: %(default)s)")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--latency-prompt-tokens", type=int, default=256)
    parser.add_argument("--latency-output-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", help="engine and HF dtype on GPU (CPU: float32)")
    parser.add_argument("--tokenizer", help="tokenizer dir for the dummy models (default: the embedded model's)")
    parser.add_argument("--max-model-len", type=int, help="engine max_model_len (default: the engine's)")
    parser.add_argument("--max-num-seqs", type=int, help="engine max_num_seqs (default: the engine's)")
    parser.add_argument("--max-num-batched-tokens", type=int, help="engine token budget per step")
    parser.add_argument("--gpu-memory-utilization", type=float, help="engine KV sizing (default: the engine's)")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                        help="engine KV-cache dtype (fp8: float8 e4m3, half the KV bytes of bf16)")
    parser.add_argument("--enforce-eager", action="store_true", help="engine without CUDA graphs")
    parser.add_argument("--piecewise-max-tokens", type=int,
                        help="engine.cuda_graph_piecewise_max_tokens (default: the engine's; 0: those steps eager)")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="engine waits for each step's tokens before scheduling the next")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers baselines")
    parser.add_argument("--hf-modes", default=HF_MODES_DEFAULT, help="HF baselines to run (default: %(default)s)")
    parser.add_argument("--hf-batch-size", type=int, default=64, help="static batch size of HF generate")
    parser.add_argument("--skip-latency", action="store_true", help="skip batch-1 decode latency")
    parser.add_argument("--results-dir", type=Path, help="where the JSON goes (default: bench/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (for CI)")
    parser.add_argument("--seed", type=int, default=0)


def _smoke_overrides(args: argparse.Namespace) -> None:
    args.models = SMOKE_MODEL
    args.num_requests, args.prompt_tokens, args.output_tokens = 4, 16, 6
    args.latency_prompt_tokens, args.latency_output_tokens = 16, 4
    args.hf_batch_size = 2
    # generate_batch spends ~30 s on CPU in its own machinery even for 4 tiny requests: opt-in only.
    if args.hf_modes == HF_MODES_DEFAULT:
        args.hf_modes = "generate"
    args.max_model_len = args.max_model_len or 128


def _default_tokenizer() -> str | None:
    from appliance.models.fetch import default_model_dir, is_complete

    path = default_model_dir()
    return str(path) if is_complete(path) else None


def build_engine(model: str, args: argparse.Namespace, device: torch.device) -> Any:
    from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from appliance.engine.llm_engine import EngineCore

    defaults = EngineConfig()
    cache, sched = defaults.cache, defaults.scheduler
    config = EngineConfig(
        model=ModelConfig(model=model, load_format="dummy", dtype=args.dtype if device.type == "cuda" else "float32",
                          device=device.type, seed=args.seed, tokenizer=args.tokenizer),
        cache=CacheConfig(
            block_size=cache.block_size,
            gpu_memory_utilization=args.gpu_memory_utilization or cache.gpu_memory_utilization,
            cpu_kv_cache_bytes=cache.cpu_kv_cache_bytes if device.type == "cuda" else 64 << 20,
            kv_cache_dtype=getattr(args, "kv_cache_dtype", cache.kv_cache_dtype),
        ),
        scheduler=SchedulerConfig(
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs or sched.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens or sched.max_num_batched_tokens,
        ),
        enforce_eager=args.enforce_eager,
        async_scheduling=not args.no_async_scheduling,
        cuda_graph_piecewise_max_tokens=(defaults.cuda_graph_piecewise_max_tokens if args.piecewise_max_tokens is None
                                         else args.piecewise_max_tokens),
    )
    # Offline, like `LLM.generate`: outputs for finished requests only (the HTTP server streams).
    return EngineCore(config, stream_outputs=False)


def _sampling(max_tokens: int) -> Any:
    from appliance.engine.sequence import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)


def engine_startup(model: str, args: argparse.Namespace, device: torch.device) -> tuple[Any, float]:
    """Build the engine and serve one token: the time an operator waits after `serve`."""
    t0 = time.perf_counter()
    engine = build_engine(model, args, device)
    engine.add_request("startup", [7] * 16, _sampling(1))
    while engine.has_unfinished_requests():
        engine.step()
    return engine, time.perf_counter() - t0


def engine_decode_latency_ms(engine: Any, prompt: list[int], output_tokens: int) -> float:
    """Batch-1 ms per output token after the first (the first one carries the prefill).

    Streams outputs while it runs (the engine is built final-only for W1): the first token's
    arrival must be seen, as a streaming client sees it.
    """
    streaming, engine.stream_outputs = engine.stream_outputs, True
    try:
        engine.add_request("latency", prompt, _sampling(output_tokens))
        first_token_at = None
        while engine.has_unfinished_requests():
            outputs = engine.step()
            if first_token_at is None and outputs and outputs[0].outputs[0].token_ids:
                first_token_at = time.perf_counter()
        done_at = time.perf_counter()
    finally:
        engine.stream_outputs = streaming
    assert first_token_at is not None and outputs and outputs[-1].finished
    return (done_at - first_token_at) / max(1, output_tokens - 1) * 1e3


def engine_throughput(engine: Any, prompts: list[list[int]], output_tokens: int) -> dict[str, Any]:
    """Submit every request at once, step until all finish. Also records the cyclic GC's
    collections and time during the run (a full collection is a host pause the size of a
    135M W1's regression)."""
    from appliance_bench.step_host_time import GcWatch

    with GcWatch() as watch:
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.add_request(f"w1-{i}", prompt, _sampling(output_tokens))
        generated = 0
        steps = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    generated += len(out.outputs[0].token_ids)
            steps += 1
        elapsed = time.perf_counter() - t0
    stats = engine.stats()
    return {"time_s": elapsed, "output_tokens": generated, "steps": steps,
            "num_preemptions": stats.num_preemptions, "piecewise_steps": engine.runner.piecewise_steps,
            **watch.record()}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_model(model: str, args: argparse.Namespace, device: torch.device, ceilings: dict[str, float],
                result: dict[str, Any], checkpoint: Callable[[], None]) -> None:
    """Every measurement of one model into `result`, with `checkpoint()` after each phase."""
    from appliance_bench import roofline
    from appliance_bench.hf_baseline import run_hf

    from appliance.models.dummy_configs import DUMMY_CONFIGS

    architecture = DUMMY_CONFIGS[model]
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    shape = roofline.shape_from_hf_dict(model, architecture, torch.empty((), dtype=dtype).element_size())
    rng = random.Random(args.seed)
    vocab = shape.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(args.num_requests)]
    latency_prompt = [rng.randrange(vocab) for _ in range(args.latency_prompt_tokens)]
    result.update({"model": model, "dtype": str(dtype).removeprefix("torch."), "weight_bytes": shape.weight_bytes})

    if not args.no_hf:  # first, so the engine then sizes its KV cache with the GPU to itself
        result["hf"] = {}
        run_hf(architecture, device, dtype, prompts, args.output_tokens, latency_prompt, args.latency_output_tokens,
               [m for m in args.hf_modes.split(",") if m], args.hf_batch_size, result["hf"], checkpoint)
        _free(device)

    engine, startup_s = engine_startup(model, args, device)
    result["startup_s"] = startup_s
    result["max_num_seqs"] = engine.scheduler.max_num_seqs if hasattr(engine.scheduler, "max_num_seqs") else None
    result["num_kv_blocks"] = engine.runner.num_kv_blocks
    checkpoint()
    if not args.skip_latency:
        engine_decode_latency_ms(engine, latency_prompt[:16], 4)  # warm-up of the latency path
        result["decode_ms_per_token"] = engine_decode_latency_ms(engine, latency_prompt, args.latency_output_tokens)
        result["decode_floor_ms_per_token"] = shape.weight_bytes / ceilings["copy_bytes_per_s"] * 1e3
        checkpoint()
    w1 = engine_throughput(engine, prompts, args.output_tokens)
    print(f"W1 GC: collections per generation {w1['gc_collections']}, ms {w1['gc_ms']}", flush=True)
    floor = roofline.workload_floor_s(shape, args.num_requests, args.prompt_tokens, args.output_tokens,
                                      max_batch=result["max_num_seqs"] or 512,
                                      copy_bytes_per_s=ceilings["copy_bytes_per_s"],
                                      matmul_flops_per_s=ceilings["matmul_flops_per_s"])
    w1["output_tok_s"] = w1["output_tokens"] / w1["time_s"]
    w1["total_tok_s"] = args.num_requests * (args.prompt_tokens + args.output_tokens) / w1["time_s"]
    w1["roofline"] = floor
    w1["roofline_fraction"] = floor["floor_s"] / w1["time_s"]
    result["w1"] = w1
    result["ratios"] = hf_ratios(result)
    checkpoint()
    del engine
    _free(device)


def hf_ratios(result: dict[str, Any]) -> dict[str, float]:
    """Engine over HF: output tok/s for W1 (each HF mode), HF ms/token over ours for batch-1 decode."""
    hf = result.get("hf", {})
    ratios = {}
    for mode in ("generate", "generate_batch"):
        run = hf.get(mode)
        if run and run.get("output_tokens"):
            ratios[f"w1_vs_hf_{mode}"] = result["w1"]["output_tok_s"] / (run["output_tokens"] / run["time_s"])
    if hf.get("decode_ms_per_token") and result.get("decode_ms_per_token"):
        ratios["decode_latency_vs_hf"] = hf["decode_ms_per_token"] / result["decode_ms_per_token"]
    return ratios


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}x" if a and b else "-"


def format_table(results: list[dict[str, Any]]) -> str:
    header = (f"{'model':<14} {'W1 out tok/s':>12} {'total tok/s':>11} {'roofline':>8} {'ms/token b1':>11} "
              f"{'floor ms':>8} {'startup s':>9} {'HF gen tok/s':>12} {'HF batch tok/s':>14} {'HF ms/tok':>9} "
              f"{'x gen_batch':>11}")
    lines = [header]
    for r in results:
        w1, hf = r["w1"], r.get("hf", {})
        hf_gen = hf.get("generate", {})
        hf_batch = hf.get("generate_batch", {})
        hf_gen_tps = hf_gen["output_tokens"] / hf_gen["time_s"] if hf_gen else None
        hf_batch_tps = hf_batch["output_tokens"] / hf_batch["time_s"] if hf_batch.get("output_tokens") else None
        lines.append(
            f"{r['model']:<14} {w1['output_tok_s']:12.0f} {w1['total_tok_s']:11.0f} "
            f"{100 * w1['roofline_fraction']:7.1f}% {r.get('decode_ms_per_token', float('nan')):11.2f} "
            f"{r.get('decode_floor_ms_per_token', float('nan')):8.2f} {r['startup_s']:9.1f} "
            f"{hf_gen_tps or float('nan'):12.0f} {hf_batch_tps or float('nan'):14.0f} "
            f"{hf.get('decode_ms_per_token', float('nan')):9.2f} {_ratio(w1['output_tok_s'], hf_batch_tps):>11}")
        for key, value in hf.items():
            if key.endswith("_error"):
                lines.append(f"  HF {key}: {value}")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    from appliance_bench import roofline
    from appliance_bench.results import write_result

    if args.smoke:
        _smoke_overrides(args)
    if args.tokenizer is None:
        args.tokenizer = _default_tokenizer()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        ceilings = {"copy_bytes_per_s": roofline.measure_copy_bytes_per_s(device),
                    "matmul_flops_per_s": roofline.measure_matmul_flops_per_s(device)}
    else:
        ceilings = {"copy_bytes_per_s": roofline.measure_copy_bytes_per_s(device, 32 << 20),
                    "matmul_flops_per_s": roofline.measure_matmul_flops_per_s(device, 256, torch.float32)}
    print(f"device {device}: copy {ceilings['copy_bytes_per_s'] / 1e12:.3f} TB/s, matmul "
          f"{ceilings['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
    workload = {k: getattr(args, k) for k in ("num_requests", "prompt_tokens", "output_tokens",
                                              "latency_prompt_tokens", "latency_output_tokens", "smoke",
                                              "enforce_eager", "max_num_seqs", "max_model_len", "hf_modes",
                                              "hf_batch_size", "no_hf", "no_async_scheduling")}
    results: list[dict[str, Any]] = []

    def checkpoint() -> Path:
        return write_result({"benchmark": "offline-W1", "workload": workload, "ceilings": ceilings,
                             "results": results}, "offline-smoke" if args.smoke else "offline", args.results_dir)

    for model in [m for m in args.models.split(",") if m]:
        print(f"--- {model}", flush=True)
        results.append({})
        bench_model(model, args, device, ceilings, results[-1], checkpoint)
        print(format_table(results[-1:]), flush=True)
    print(format_table(results))
    print("wrote", checkpoint())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance_bench.offline", description=__doc__.splitlines()[0])
    add_arguments_bench(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
