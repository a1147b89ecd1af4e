"""What the HTTP side costs the engine: the same workload offline and through the OpenAI server.

Modes (`--modes`, run in this order):
- offline: every request added to `EngineCore`, `step()` until done (the core's own deltas);
- bridge: `AsyncEngine.generate` over the in-process client, no HTTP;
- http: the aiohttp app on loopback over the in-process client (engine.process = "inline");
- bridge-process, http-process: the same over an engine process ("separate"); the in-process
  core is released first, so the child has the device to itself.
The HTTP load generator runs in a separate process (streaming `/v1/completions` with token-id
prompts, all requests at once, as real clients would be other processes) and counts SSE events
as well as tokens: `*_tokens_per_event` is 1.0 when every engine step makes one event. Each run
gets fresh random prompts so prefix caching helps none. Targets: http-process >= 0.92 of offline.

    python -m appliance_bench.online --model smollm2-135m --load-format dummy --tokenizer DIR
    python -m appliance_bench.online --smoke          # the embedded model on CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import random
import sys
import time
from typing import Any


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m appliance_bench.online", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="model dir, 'default', or a dummy architecture")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--tokenizer", help="tokenizer dir (needed for dummy architectures)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--modes", default="offline,bridge,http,bridge-process,http-process",
                        help="offline, bridge, http, bridge-process, http-process (see the module doc)")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="sys.setswitchinterval for the online runs (GIL hand-over latency)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, CI)")
    parser.add_argument("--out", help="write the JSON result here too")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_requests, args.prompt_tokens, args.output_tokens = 8, 16, 8
    return args


def _prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 1) for _ in range(length)] for _ in range(num)]


def _offline(core: Any, prompts: list[list[int]], output_tokens: int) -> float:
    from appliance.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        core.add_request(f"offline-{i}", prompt, params)
    generated = 0
    while core.has_unfinished_requests():
        for delta in core.step():
            generated += len(delta.outputs[0].token_ids)
    return generated / (time.perf_counter() - start)


def _load_generator(port: int, prompts: list[list[int]], output_tokens: int, stream: bool, conn: Any) -> None:
    """Runs in a child process: all requests at once; sends (tokens, events, seconds)."""
    import aiohttp

    async def run() -> tuple[int, int, float]:
        url = f"http://127.0.0.1:{port}/v1/completions"
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600)) as s:

            async def one(prompt: list[int]) -> tuple[int, int]:
                body = {"prompt": prompt, "max_tokens": output_tokens, "temperature": 0, "ignore_eos": True,
                        "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
                async with s.post(url, json=body) as response:
                    assert response.status == 200, await response.text()
                    if not stream:
                        return int((await response.json())["usage"]["completion_tokens"]), 1
                    tokens = events = 0
                    async for line in response.content:
                        if not line.startswith(b"data: {"):
                            continue
                        if b'"usage":{' in line:
                            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                        elif b'"choices":[{' in line:
                            events += 1
                    return tokens, events

            start = time.perf_counter()
            counts = await asyncio.gather(*(one(p) for p in prompts))
            return sum(c[0] for c in counts), sum(c[1] for c in counts), time.perf_counter() - start

    conn.send(asyncio.run(run()))
    conn.close()


async def _start_engine(core: Any, config: Any) -> Any:
    """An AsyncEngine (started) over the in-process core, or over a new engine process."""
    from appliance.engine.async_engine import AsyncEngine
    from appliance.engine.core_client import InprocClient

    if config is None:
        engine = AsyncEngine(InprocClient(core))
        await engine.start()
        return engine
    from appliance.engine.core_process import ProcessClient

    engine = AsyncEngine(await ProcessClient.spawn(config))
    await engine.start()
    # The same short warm-up run as the in-process core had (one-time costs count in no mode).
    await _bridge_run(engine, _prompts(8, 16, engine.vocab_size, 1), 4, "warm")
    return engine


async def _bridge_run(engine: Any, prompts: list[list[int]], output_tokens: int, tag: str) -> int:
    from appliance.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> int:
        tokens = 0
        async for delta in engine.generate(f"{tag}-{i}", prompt, params):
            tokens += len(delta.outputs[0].token_ids)
        return tokens

    return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def _bridge(core: Any, prompts: list[list[int]], output_tokens: int, config: Any = None) -> dict[str, float]:
    """AsyncEngine alone: what the hand-over to the front end costs, without HTTP."""
    engine = await _start_engine(core, config)
    start = time.perf_counter()
    tokens = await _bridge_run(engine, prompts, output_tokens, "bridge")
    seconds = time.perf_counter() - start
    steps = engine.stats().num_steps
    await engine.shutdown()
    return {"output_tok_s": tokens / seconds, "steps_total": steps}


async def _online(core: Any, prompts: list[list[int]], output_tokens: int, stream: bool,
                  config: Any = None) -> dict[str, float]:
    """Through HTTP; with `config`, the engine runs in a child process (ProcessClient)."""
    from appliance.config import AppConfig, ServerConfig
    from appliance.server.app import make_app, start_site

    engine = await _start_engine(core, config)
    app = make_app(AppConfig(server=ServerConfig(max_queued_requests=1 << 20, max_queued_tokens=1 << 40)), engine)
    runner, port = await start_site(app, "127.0.0.1", 0)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_load_generator, args=(port, prompts, output_tokens, stream, child))
    proc.start()
    tokens, events, seconds = await asyncio.to_thread(parent.recv)
    proc.join()
    steps = engine.stats().num_steps
    await runner.cleanup()
    await engine.shutdown()
    return {"output_tok_s": tokens / seconds, "tokens_per_event": tokens / max(events, 1), "steps_total": steps}


def main(argv: list[str] | None = None) -> int:
    import torch

    from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from appliance.engine.llm_engine import EngineCore

    args = _parse_args(argv)
    config = EngineConfig(
        model=ModelConfig(model=args.model, load_format=args.load_format, tokenizer=args.tokenizer,
                          dtype=args.dtype),
        cache=CacheConfig(enable_prefix_caching=False, **(
            {"gpu_memory_utilization": args.gpu_memory_utilization} if args.gpu_memory_utilization else {})),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                  max_model_len=args.prompt_tokens + args.output_tokens + 16),
    )
    modes = args.modes.split(",")
    unknown = set(modes) - {"offline", "bridge", "http", "bridge-process", "http-process"}
    if unknown:
        raise SystemExit(f"unknown mode(s): {', '.join(sorted(unknown))}")
    core = None
    if any(not m.endswith("-process") for m in modes):
        core = EngineCore(config)
        core.warmup()
        vocab = core.vocab_size
        # A short run first, so one-time costs (compilation, allocator growth) count in no mode.
        _offline(core, _prompts(min(8, args.num_requests), args.prompt_tokens, vocab, 1), 4)
    else:  # nothing loaded here: the child has the device to itself
        from appliance.models.loader import resolve_model

        vocab = int(resolve_model(config.model).hf_config.vocab_size)
    result: dict[str, Any] = {
        "bench": "online-vs-offline",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": _commit(),
        "model": args.model, "num_requests": args.num_requests, "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens, "stream": args.stream,
        "switch_interval_ms": args.switch_interval_ms,
    }
    for seed, mode in enumerate(modes, start=2):
        prompts = _prompts(args.num_requests, args.prompt_tokens, vocab, seed)
        if mode.endswith("-process") and core is not None:
            del core  # the engine process gets the device to itself
            core = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        steps_before = core.stats().num_steps if core is not None else 0
        if mode != "offline" and args.switch_interval_ms is not None:
            sys.setswitchinterval(args.switch_interval_ms / 1000)
        child_config = config if mode.endswith("-process") else None
        if mode == "offline":
            figures: dict[str, float] = {"output_tok_s": _offline(core, prompts, args.output_tokens)}
        elif mode.startswith("bridge"):
            figures = asyncio.run(_bridge(core, prompts, args.output_tokens, child_config))
        else:
            figures = asyncio.run(_online(core, prompts, args.output_tokens, args.stream, child_config))
        sys.setswitchinterval(0.005)
        steps_total = figures.pop("steps_total", None)
        for key, value in figures.items():
            result[f"{mode}_{key}"] = round(value, 3 if key == "tokens_per_event" else 1)
        result[f"{mode}_steps"] = (core.stats().num_steps - steps_before) if core is not None else steps_total
        print(json.dumps({k: v for k, v in result.items() if k.startswith(mode)}), file=sys.stderr, flush=True)
        if args.out:  # rewritten after every mode: a run cut short keeps its numbers
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
    if "offline" in modes:
        for mode in modes:
            if mode != "offline":
                result[f"{mode}_over_offline"] = round(result[f"{mode}_output_tok_s"]
                                                       / result["offline_output_tok_s"], 3)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


def _commit() -> str | None:
    import os
    import subprocess

    if os.environ.get("LLM_APPLIANCE_COMMIT"):
        return os.environ["LLM_APPLIANCE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
