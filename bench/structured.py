"""Constrained decoding cost on the GPU (issue 12's targets), in one run:

- TPOT at batch 64 with a json_schema grammar vs the same batch unconstrained, on the dummy
  Llama-3.1-8B shape (target: within 5%). The schema (a typical object with a nested array of
  >= 40 objects first) cannot complete within the output length, so every step of every row is
  masked, structural tokens included;
- compile time of a typical schema (10 fields, nested object, enum, array): cold (tokenizer
  table already built) and from the cache (targets: <= 50 ms and <= 1 ms).

Tokens: the default model's tokenizer (49,152 entries) padded to the model's vocabulary unless
`--tokenizer` names another directory (a real Llama 3 tokenizer makes masks over 128k entries).

    python -m appliance_bench.structured            # JSON to $OUT/structured.json (or stdout)
    python -m appliance_bench.structured --smoke    # tiny model on CPU (CI keeps it working)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from appliance_bench.grammar_backends import TYPICAL_SCHEMA

# Rows stay inside `events` for the whole output: 40 items of ~12 tokens each are needed first.
STEADY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "events": {"type": "array", "minItems": 40, "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                           "kind": {"enum": ["create", "update", "delete"]}, "ok": {"type": "boolean"}},
            "required": ["id", "kind", "ok"], "additionalProperties": False}},
        **TYPICAL_SCHEMA["properties"],
    },
    "required": ["events", *TYPICAL_SCHEMA["required"]],
    "additionalProperties": False,
}


def _engine(args: argparse.Namespace, device: torch.device) -> Any:
    from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from appliance.engine.llm_engine import EngineCore

    defaults = EngineConfig()
    config = EngineConfig(
        model=ModelConfig(model=args.model, load_format="dummy", device=device.type, seed=0,
                          dtype="bfloat16" if device.type == "cuda" else "float32", tokenizer=args.tokenizer),
        cache=CacheConfig(block_size=defaults.cache.block_size,
                          cpu_kv_cache_bytes=defaults.cache.cpu_kv_cache_bytes if device.type == "cuda" else 64 << 20),
        scheduler=SchedulerConfig(max_model_len=args.prompt_tokens + args.output_tokens + 16,
                                  max_num_seqs=max(args.batch, 8),
                                  max_num_batched_tokens=max(defaults.scheduler.max_num_batched_tokens,
                                                             args.batch * args.prompt_tokens)),
    )
    return EngineCore(config, stream_outputs=False)


def _batch(engine: Any, prompts: list[list[int]], args: argparse.Namespace, spec: Any, tag: str) -> dict[str, Any]:
    """Run the batch to completion; TPOT per request from the engine's own timestamps."""
    from appliance.engine.sequence import SamplingParams

    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, SamplingParams(max_tokens=args.output_tokens, temperature=0.0,
                                                                ignore_eos=True, structured=spec))
    tpots, tokens, steps = [], 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if not out.finished:
                continue
            n = len(out.outputs[0].token_ids)
            tokens += n
            m = out.metrics
            if m is not None and m.first_token_time is not None and m.finished_time is not None and n > 1:
                tpots.append((m.finished_time - m.first_token_time) / (n - 1))
        steps += 1
    elapsed = time.perf_counter() - t0
    return {"tpot_ms_mean": statistics.fmean(tpots) * 1e3, "tpot_ms_median": statistics.median(tpots) * 1e3,
            "output_tokens": tokens, "steps": steps, "time_s": elapsed}


def _compile_times(engine: Any, repeats: int) -> dict[str, Any]:
    from appliance.structured.spec import json_schema_spec

    structured = engine.structured
    t0 = time.perf_counter()
    structured.compiler.compile_now(json_schema_spec({"type": "string"}, "warm"))  # builds the tokenizer table
    table_s = time.perf_counter() - t0
    cold, cached = [], []
    for i in range(repeats):
        schema = json.loads(json.dumps(TYPICAL_SCHEMA))
        schema["properties"][f"extra_{i}"] = {"type": "string"}  # a new spec: a real compile
        spec = json_schema_spec(schema, "bench")
        t0 = time.perf_counter()
        structured.compiler.compile_now(spec)
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        structured.compiler.compile_now(spec)
        cached.append(time.perf_counter() - t0)
    return {"tokenizer_table_ms": table_s * 1e3, "compile_cold_ms_median": statistics.median(cold) * 1e3,
            "compile_cold_ms_max": max(cold) * 1e3, "compile_cached_ms_median": statistics.median(cached) * 1e3,
            "compile_cached_ms_max": max(cached) * 1e3}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from appliance.structured.spec import json_schema_spec

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    engine = _engine(args, device)
    rng = random.Random(0)
    vocab = min(engine.vocab_size, len(engine.tokenizer))

    def prompts(count: int) -> list[list[int]]:
        return [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(count)]

    spec = json_schema_spec(STEADY_SCHEMA, "bench")
    compile_times = _compile_times(engine, args.repeats)
    # Warm-up: graphs, allocator, the grammar's matchers and masks, both paths.
    _batch(engine, prompts(args.batch), args, None, "warm-plain")
    _batch(engine, prompts(args.batch), args, spec, "warm-json")
    runs: dict[str, list[dict[str, Any]]] = {"unconstrained": [], "json_schema": [], "json_schema_threaded_fill": []}
    fill_threads = max(1, min(8, (os.cpu_count() or 2) // 2))
    for r in range(args.rounds):  # interleaved, so drift hits all alike
        runs["unconstrained"].append(_batch(engine, prompts(args.batch), args, None, f"plain-{r}"))
        engine.structured.fill_threads = 0
        runs["json_schema"].append(_batch(engine, prompts(args.batch), args, spec, f"json-{r}"))
        engine.structured.fill_threads = fill_threads
        runs["json_schema_threaded_fill"].append(_batch(engine, prompts(args.batch), args, spec, f"jsonmt-{r}"))
        engine.structured.fill_threads = 0
    plain = statistics.median(x["tpot_ms_mean"] for x in runs["unconstrained"])
    constrained = statistics.median(x["tpot_ms_mean"] for x in runs["json_schema"])
    threaded = statistics.median(x["tpot_ms_mean"] for x in runs["json_schema_threaded_fill"])
    from appliance_bench.results import result_header

    return {
        **result_header(),
        "what": "json_schema-constrained TPOT vs unconstrained at batch B, and schema compile times",
        "model": args.model, "tokenizer": args.tokenizer or "default model's", "vocab_size": engine.vocab_size,
        "tokenizer_entries": len(engine.tokenizer), "batch": args.batch, "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens, "async_scheduling": engine.async_scheduling,
        "tpot_ms_unconstrained": plain, "tpot_ms_json_schema": constrained,
        "tpot_overhead_fraction": constrained / plain - 1.0, "target_tpot_overhead_fraction": 0.05,
        "fill_threads": fill_threads, "tpot_ms_json_schema_threaded_fill": threaded,
        "tpot_overhead_fraction_threaded_fill": threaded / plain - 1.0,
        "compile": compile_times, "target_compile_cold_ms": 50.0, "target_compile_cached_ms": 1.0,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="dummy architecture (default: %(default)s)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the default model's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="compile-time samples")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (for CI)")
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT/structured.json, else stdout)")
    args = parser.parse_args(argv)
    if args.tokenizer is None:
        from appliance.models.fetch import ensure_default_model

        args.tokenizer = str(ensure_default_model(progress=False))
    if args.smoke:
        args.model, args.batch, args.prompt_tokens, args.output_tokens = "tiny-llama", 4, 8, 6
        args.rounds, args.repeats = 1, 2
    result = run(args)
    text = json.dumps(result, indent=2, default=str)
    out = args.out or (os.path.join(os.environ["OUT"], "structured.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
