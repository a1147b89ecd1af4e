"""How many SSE events per second the server's process sends: the HTTP side alone, at GPU pace.

The real app (`server/app.py`, routes, admission, metrics, SSE) and the real `AsyncEngine` run over
a paced stand-in for the engine process: a thread that, every `--step-ms`, makes one step's
`StepOutputs` (one new token for every running request, as a decode step does), encodes it with
the engine process's codec and hands the bytes to the loop, which decodes them as `ProcessClient`
does. No model runs, so on a CPU box the figures are those of an H200 serving a small model: a
step every few milliseconds for hundreds of streams. A load generator in another process opens
`--streams` streaming `/v1/completions` at once and counts tokens and events.

What it reports: events/s, tokens per event (1.0: every step made one event per request; 2.0:
the loop fell behind and merged two steps per event) and the server process's CPU time per event.

    python -m appliance_bench.sse_capacity --streams 256 --step-ms 8 --tokens 256 [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import threading
import time
from typing import Any

import msgspec


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m appliance_bench.sse_capacity",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--step-ms", type=float, default=8.0)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per stream")
    parser.add_argument("--tokenizer", help="tokenizer dir (token texts); default: the default model's")
    parser.add_argument("--chat", action="store_true", help="/v1/chat/completions instead of /v1/completions")
    parser.add_argument("--profile", help="cProfile the server process's loop into this file")
    parser.add_argument("--out", help="write the JSON result here too")
    return parser.parse_args(argv)


class PacedCore:
    """An `EngineCoreClient` whose 'engine' is a clock: one token per running request per step.

    It stands in for the engine process only in this benchmark, to load the HTTP side at a
    GPU's pace on any machine. Token ids cycle through ordinary vocabulary ids.
    """

    def __init__(self, step_s: float, tokenizer: Any, vocab_size: int) -> None:
        from appliance.engine.core_client import EngineInfo
        from appliance.engine.outputs import EngineStats

        self.info = EngineInfo("paced", 4096, vocab_size, tokenizer)
        self._step_s = step_s
        self._lock = threading.Lock()
        self._running: dict[str, list[int]] = {}  # id -> [produced, max_tokens]
        self._stop = False
        self._thread: threading.Thread | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._stats = EngineStats(0, 0, 1, 0, 0, 0.0, 0, 0, 0, 0, 0, 0, time.monotonic())
        self.steps = 0
        self._texts = [tokenizer.decode([t]) for t in range(1000, 1256)] if tokenizer is not None else None

    def start(self, loop: asyncio.AbstractEventLoop, sink: Any) -> None:
        from appliance.engine.messages import StepOutputs

        decoder = msgspec.msgpack.Decoder(StepOutputs)

        def deliver(data: bytes) -> None:
            sink.on_outputs(decoder.decode(data))

        self._thread = threading.Thread(target=self._run, args=(loop, deliver), daemon=True)
        self._thread.start()

    def _run(self, loop: asyncio.AbstractEventLoop, deliver: Any) -> None:
        from appliance.engine.messages import StepOutputs
        from appliance.engine.outputs import CompletionDelta, RequestDelta, RequestMetrics

        next_t = time.perf_counter()
        while not self._stop:
            next_t += self._step_s
            with self._lock:
                items = list(self._running.items())
            deltas = []
            now = time.monotonic()
            for rid, state in items:
                token = 1000 + state[0] % 256
                state[0] += 1
                done = state[0] >= state[1]
                text = self._texts[token - 1000] if self._texts is not None else ""
                deltas.append(RequestDelta(rid, [CompletionDelta(0, [token], text, None, "length" if done else None)],
                                           done, 0, RequestMetrics(now, now, now, now) if done else None))
                if done:
                    with self._lock:
                        self._running.pop(rid, None)
            if deltas:
                self.steps += 1
                self._stats.last_step_time = now
                payload = self._encoder.encode(StepOutputs(deltas, [], self._stats, True))
                loop.call_soon_threadsafe(deliver, payload)
            delay = next_t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.perf_counter()

    def add_request(self, request: Any) -> None:
        with self._lock:
            self._running[request.request_id] = [0, request.params.max_tokens]

    def abort(self, request_ids: list[str]) -> None:
        with self._lock:
            for rid in request_ids:
                self._running.pop(rid, None)

    async def shutdown(self) -> None:
        self._stop = True
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def stats(self) -> Any:
        return self._stats

    def is_progressing(self, stall_timeout_s: float) -> bool:
        return True


def _load_generator(port: int, streams: int, tokens: int, chat: bool, conn: Any) -> None:
    """Child process: every stream at once; sends (tokens, events, seconds)."""
    import aiohttp

    async def run() -> tuple[int, int, float]:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        url = f"http://127.0.0.1:{port}{path}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=3600)) as s:

            async def one(i: int) -> tuple[int, int]:
                body: dict[str, Any] = {"model": "paced", "max_tokens": tokens, "ignore_eos": True, "stream": True,
                                        "stream_options": {"include_usage": True}}
                if chat:
                    body["messages"] = [{"role": "user", "content": f"question {i}"}]
                else:
                    body["prompt"] = [1000 + i % 100, 2000, 3000]
                async with s.post(url, json=body) as response:
                    assert response.status == 200, await response.text()
                    count = events = 0
                    async for line in response.content:
                        if not line.startswith(b"data: {"):
                            continue
                        if b'"usage":{' in line:
                            count = json.loads(line[6:])["usage"]["completion_tokens"]
                        elif b'"choices":[{' in line:
                            events += 1
                    return count, events

            start = time.perf_counter()
            counts = await asyncio.gather(*(one(i) for i in range(streams)))
            return sum(c[0] for c in counts), sum(c[1] for c in counts), time.perf_counter() - start

    conn.send(asyncio.run(run()))
    conn.close()


async def _serve(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    from appliance.config import AppConfig, ServerConfig
    from appliance.engine.async_engine import AsyncEngine
    from appliance.server.app import make_app, start_site

    core = PacedCore(args.step_ms / 1000, tokenizer, len(tokenizer) if tokenizer is not None else 49152)
    engine = AsyncEngine(core)
    await engine.start()
    app = make_app(AppConfig(server=ServerConfig(max_queued_requests=1 << 20, max_queued_tokens=1 << 40)), engine)
    runner, port = await start_site(app, "127.0.0.1", 0)
    gc.collect()  # as the daemon does once it serves
    gc.freeze()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_load_generator, args=(port, args.streams, args.tokens, args.chat, child))
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cpu0, steps0 = time.process_time(), core.steps
    proc.start()
    tokens, events, seconds = await asyncio.to_thread(parent.recv)
    cpu = time.process_time() - cpu0
    steps = core.steps - steps0
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    proc.join()
    await runner.cleanup()
    await engine.shutdown()
    return {
        "streams": args.streams, "step_ms": args.step_ms, "tokens_per_stream": args.tokens,
        "route": "chat" if args.chat else "completions",
        "output_tok_s": round(tokens / seconds, 1), "events_s": round(events / seconds, 1),
        "tokens_per_event": round(tokens / max(events, 1), 3),
        "ideal_tok_s": round(args.streams / (args.step_ms / 1000), 1),
        "engine_steps": steps, "tokens_total": tokens, "events_total": events,
        # includes the stand-in's thread (small: one struct per request per step) and the encode
        "server_cpu_us_per_event": round(cpu / max(events, 1) * 1e6, 2),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from appliance.models.fetch import default_model_dir  # the default model's tokenizer
    from appliance.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or str(default_model_dir()))
    result = {"bench": "sse-capacity", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **asyncio.run(_serve(args, tokenizer))}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
