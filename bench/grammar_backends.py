"""xgrammar vs llguidance on our workload: which one constrains decoding (issue 12).

Measured on the host CPU with the default model's tokenizer (49,152 tokens) or any tokenizer
directory (`--tokenizer`):
- compile time of a typical schema (10 fields, a nested object, an enum, an array): cold
  (first compile, new tokenizer-side state where the library keeps some) and cached;
- per-step mask time at batch 64: 64 matchers walking the tokens of one valid instance, one
  bitmask [64, ceil(V/32)] filled per step (what the engine does before each constrained step),
  plus the token advance (accept) of the 64 rows.

    .venv/bin/python -m appliance_bench.grammar_backends --out bench/results/grammar_backends_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

TYPICAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "email": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city", "zip"], "additionalProperties": False},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["id", "name", "email", "age", "score", "active", "role", "tags", "address", "notes"],
    "additionalProperties": False,
}

TYPICAL_INSTANCE = {
    "id": 42, "name": "Ada Lovelace", "email": "ada@example.org", "age": 36, "score": 97.5, "active": True,
    "role": "editor", "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"}, "notes": None,
}


def _variant(i: int) -> dict[str, Any]:
    """A distinct schema per cold compile (a library cache must not serve it)."""
    schema = json.loads(json.dumps(TYPICAL_SCHEMA))
    schema["properties"][f"extra_{i}"] = {"type": "string"}
    return schema


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


def bench_xgrammar(tokenizer: Any, vocab_size: int, tokens: list[int], batch: int, repeats: int) -> dict[str, Any]:
    import torch
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    tokenizer_s = time.perf_counter() - t0
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)
    cold = []
    for i in range(repeats):
        text = json.dumps(_variant(i))
        t0 = time.perf_counter()
        compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"), strict_mode=True)
        cold.append(time.perf_counter() - t0)
    text = json.dumps(TYPICAL_SCHEMA)
    compiled = compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"), strict_mode=True)
    cached = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"), strict_mode=True)
        cached.append(time.perf_counter() - t0)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    bitmask = xgr.allocate_token_bitmask(batch, vocab_size)
    batch_matcher = xgr.BatchGrammarMatcher(max_threads=2)
    fill, fill_batched, accept = [], [], []
    for token in tokens:
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        fill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask)
        fill_batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for m in matchers:
            assert m.accept_token(token), token
        accept.append(time.perf_counter() - t0)
    assert all(m.is_terminated() or m.accept_token(tokenizer.eos_token_id) for m in matchers)
    logits = torch.randn(batch, vocab_size)
    t0 = time.perf_counter()
    for _ in range(20):
        xgr.apply_token_bitmask_inplace(logits, bitmask)
    apply_s = (time.perf_counter() - t0) / 20
    return {
        "version": _dist_version("xgrammar"), "tokenizer_info_ms": _ms(tokenizer_s),
        "compile_cold_ms_median": _ms(statistics.median(cold)), "compile_cold_ms_max": _ms(max(cold)),
        "compile_cached_ms_median": _ms(statistics.median(cached)),
        "mask_fill_batch_ms_median": _ms(statistics.median(fill)),
        "mask_fill_batch_ms_p99": _ms(sorted(fill)[int(0.99 * (len(fill) - 1))]),
        "mask_fill_batch_threaded_ms_median": _ms(statistics.median(fill_batched)),
        "accept_batch_ms_median": _ms(statistics.median(accept)),
        "apply_bitmask_cpu_ms": _ms(apply_s),
    }


def bench_llguidance(tokenizer: Any, vocab_size: int, tokens: list[int], batch: int, repeats: int) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as llg_torch
    import torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    tokenizer_s = time.perf_counter() - t0

    def compile_once(schema: dict[str, Any]) -> Any:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return grammar, matcher

    cold = []
    for i in range(repeats):
        t0 = time.perf_counter()
        compile_once(_variant(i))
        cold.append(time.perf_counter() - t0)
    grammar, _ = compile_once(TYPICAL_SCHEMA)
    cached = []  # llguidance keeps no grammar cache: a "cached" grammar is a new matcher from its text
    for _ in range(repeats):
        t0 = time.perf_counter()
        llguidance.LLMatcher(lltok, grammar, log_level=0)
        cached.append(time.perf_counter() - t0)
    matchers = [llguidance.LLMatcher(lltok, grammar, log_level=0) for _ in range(batch)]
    bitmask = llg_torch.allocate_token_bitmask(batch, vocab_size)
    executor = llguidance.LLExecutor(num_threads=2)
    fill, fill_par, accept = [], [], []
    for token in tokens:
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            llg_torch.fill_next_token_bitmask(m, bitmask, i)
        fill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        llg_torch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        fill_par.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for m in matchers:
            assert m.consume_token(token), m.get_error()
        accept.append(time.perf_counter() - t0)
    logits = torch.randn(batch, vocab_size)
    llg_torch.apply_token_bitmask_inplace(logits, bitmask)  # torch.compile warm-up
    t0 = time.perf_counter()
    for _ in range(20):
        llg_torch.apply_token_bitmask_inplace(logits, bitmask)
    apply_s = (time.perf_counter() - t0) / 20
    return {
        "version": _dist_version("llguidance"), "tokenizer_info_ms": _ms(tokenizer_s),
        "compile_cold_ms_median": _ms(statistics.median(cold)), "compile_cold_ms_max": _ms(max(cold)),
        "compile_cached_ms_median": _ms(statistics.median(cached)),
        "mask_fill_batch_ms_median": _ms(statistics.median(fill)),
        "mask_fill_batch_ms_p99": _ms(sorted(fill)[int(0.99 * (len(fill) - 1))]),
        "mask_fill_batch_threaded_ms_median": _ms(statistics.median(fill_par)),
        "accept_batch_ms_median": _ms(statistics.median(accept)),
        "apply_bitmask_cpu_ms": _ms(apply_s),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the default model)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON file (default: $OUT/grammar_backends.json or stdout)")
    args = parser.parse_args(argv)
    from appliance.models.tokenizer import load_tokenizer

    if args.tokenizer is None:
        from appliance.models.fetch import ensure_default_model

        args.tokenizer = str(ensure_default_model(progress=False))
    tokenizer = load_tokenizer(args.tokenizer)
    vocab_size = len(tokenizer)
    tokens = tokenizer.encode(json.dumps(TYPICAL_INSTANCE, separators=(",", ":")), add_special_tokens=False)
    results = {
        "what": "grammar backends on the host CPU: typical schema compile, mask fill at batch B",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 check=False).stdout.strip(),
        "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "tokenizer": Path(args.tokenizer).name, "vocab_size": vocab_size, "batch": args.batch,
        "instance_tokens": len(tokens),
        "xgrammar": bench_xgrammar(tokenizer, vocab_size, tokens, args.batch, args.repeats),
        "llguidance": bench_llguidance(tokenizer, vocab_size, tokens, args.batch, args.repeats),
    }
    text = json.dumps(results, indent=2)
    out = args.out or (os.path.join(os.environ["OUT"], "grammar_backends.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
