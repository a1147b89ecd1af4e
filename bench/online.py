"""What the HTTP side costs the engine: the same workload offline and through the OpenAI server.

Offline: every request added to `EngineCore`, `step()` until done. Online: the same engine behind
`AsyncEngine` + the aiohttp app on loopback, driven by a load generator in a separate process
(streaming `/v1/completions` with token-id prompts, all requests at once, as real clients would
be other processes). Each run gets fresh random prompts so prefix caching helps neither.
The ratio online/offline output tok/s is the figure DESIGN.md asks for (target: >= 0.90).

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
    parser.add_argument("--modes", default="offline,bridge,http",
                        help="offline (EngineCore.step), bridge (AsyncEngine.generate, no HTTP), http")
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
        for out in core.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
    return generated / (time.perf_counter() - start)


def _load_generator(port: int, prompts: list[list[int]], output_tokens: int, stream: bool, conn: Any) -> None:
    """Runs in a child process: all requests at once, returns (tokens received, seconds)."""
    import aiohttp

    async def main() -> tuple[int, float]:
        url = f"http://127.0.0.1:{port}/v1/completions"
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600)) as s:

            async def one(prompt: list[int]) -> int:
                body = {"prompt": prompt, "max_tokens": output_tokens, "temperature": 0, "ignore_eos": True,
                        "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
                async with s.post(url, json=body) as response:
                    assert response.status == 200, await response.text()
                    if not stream:
                        return int((await response.json())["usage"]["completion_tokens"])
                    tokens = 0
                    async for line in response.content:
                        if line.startswith(b"data: {") and b'"usage":{' in line:
                            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                    return tokens

            start = time.perf_counter()
            counts = await asyncio.gather(*(one(p) for p in prompts))
            return sum(counts), time.perf_counter() - start

    conn.send(asyncio.run(main()))
    conn.close()


async def _drive(engine: Any, prompts: list[list[int]], output_tokens: int) -> None:
    from appliance.engine.sequence import SamplingParams

    await engine.start()
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> None:
        async for _ in engine.generate(f"warm-{i}", prompt, params):
            pass

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


async def _bridge(core: Any, prompts: list[list[int]], output_tokens: int) -> float:
    """AsyncEngine alone: what the thread hand-over costs, without HTTP."""
    from appliance.engine.async_engine import AsyncEngine
    from appliance.engine.sequence import SamplingParams

    engine = AsyncEngine(core)
    await engine.start()
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> int:
        tokens = 0
        async for out in engine.generate(f"bridge-{i}", prompt, params):
            tokens = len(out.outputs[0].token_ids)
        return tokens

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    seconds = time.perf_counter() - start
    await engine.shutdown()
    return sum(counts) / seconds


async def _online(core: Any, prompts: list[list[int]], output_tokens: int, stream: bool,
                  config: Any = None) -> float:
    """Through HTTP; with `config`, the engine runs in a child process (ProcessAsyncEngine)."""
    from appliance.config import AppConfig, ServerConfig
    from appliance.engine.async_engine import AsyncEngine
    from appliance.server.app import make_app, start_site

    if config is not None:
        from appliance.engine.process_engine import ProcessAsyncEngine

        engine: AsyncEngine = await ProcessAsyncEngine.spawn(config)
        # The same short warm-up run as the in-process core had.
        await _drive(engine, _prompts(8, len(prompts[0]), len(engine.tokenizer), 1), 4)
    else:
        engine = AsyncEngine(core)
    await engine.start()
    app = make_app(AppConfig(server=ServerConfig(max_queued_requests=1 << 20)), engine)
    runner, port = await start_site(app, "127.0.0.1", 0)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_load_generator, args=(port, prompts, output_tokens, stream, child))
    proc.start()
    result = await asyncio.to_thread(parent.recv)
    proc.join()
    await runner.cleanup()
    await engine.shutdown()
    tokens, seconds = result
    return tokens / seconds


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
    if modes == ["http-process"]:  # nothing loaded here: the child has the GPU to itself
        from appliance.models.tokenizer import load_tokenizer

        vocab = len(load_tokenizer(args.tokenizer)) if args.tokenizer else 32000
        core = None
    else:
        core = EngineCore(config)
        core.warmup()
        vocab = len(core.tokenizer)
        # A short run first, so one-time costs (compilation, allocator growth) count in no mode.
        _offline(core, _prompts(min(8, args.num_requests), args.prompt_tokens, vocab, 1), 4)
    result: dict[str, Any] = {
        "bench": "online-vs-offline",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": args.model, "num_requests": args.num_requests, "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens, "stream": args.stream,
        "switch_interval_ms": args.switch_interval_ms,
    }
    for seed, mode in enumerate(modes, start=2):
        prompts = _prompts(args.num_requests, args.prompt_tokens, vocab, seed)
        steps_before = core.stats().num_steps if core is not None else 0
        if mode != "offline" and args.switch_interval_ms is not None:
            sys.setswitchinterval(args.switch_interval_ms / 1000)
        if mode == "offline":
            tok_s = _offline(core, prompts, args.output_tokens)
        elif mode == "http-process":
            del core
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            tok_s = asyncio.run(_online(None, prompts, args.output_tokens, args.stream, config))
            result[f"{mode}_output_tok_s"] = round(tok_s, 1)
            break  # the in-process core is gone
        elif mode == "bridge":
            tok_s = asyncio.run(_bridge(core, prompts, args.output_tokens))
        else:
            tok_s = asyncio.run(_online(core, prompts, args.output_tokens, args.stream))
        sys.setswitchinterval(0.005)
        result[f"{mode}_output_tok_s"] = round(tok_s, 1)
        result[f"{mode}_steps"] = core.stats().num_steps - steps_before
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


if __name__ == "__main__":
    raise SystemExit(main())
