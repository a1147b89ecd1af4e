"""A simulated OpenAI-compatible server whose latency grows with load in a known way.

One FIFO server of fixed service time S (an M/D/1 queue under Poisson arrivals): a request's first
token comes S after the previous request's first token or S after its own arrival, whichever is
later; then its remaining tokens stream every ITL. Its capacity is exactly 1/S requests/s: below
it TTFT stays near S, above it the queue (and TTFT) grows without bound. Times are kept on an
absolute schedule, so event-loop overhead does not accumulate into the answer.

It also exposes /metrics (vLLM's names: running, waiting, KV usage, preemptions) and fails, with
an OpenAI-shaped 400, any request whose last message or prompt contains "please fail", and any
request for model "strict" that carries `ignore_eos` (as OpenAI's own API does).

    python sim_server.py --service-ms 20 --itl-ms 2   # prints "PORT <n>" once listening
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web


class Sim:
    def __init__(self, service_s: float, itl_s: float) -> None:
        self.service_s = service_s
        self.itl_s = itl_s
        self.free_at = 0.0
        self.waiting = 0
        self.running = 0
        self.served = 0

    def first_token_at(self, arrival: float) -> float:
        start = max(arrival, self.free_at)
        self.free_at = start + self.service_s
        return self.free_at


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _chunk(endpoint: str, text: str, finish: str | None) -> dict:
    if endpoint == "chat":
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        return {"object": "chat.completion.chunk", "model": "sim", "choices": [choice], "usage": None}
    return {"object": "text_completion", "model": "sim", "usage": None,
            "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def _event(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


async def _generate(request: web.Request, endpoint: str) -> web.StreamResponse:
    arrival = time.monotonic()
    sim: Sim = request.app["sim"]
    body = await request.json()
    prompt = body["messages"][-1]["content"] if endpoint == "chat" else body["prompt"]
    if "please fail" in str(prompt):
        return web.json_response({"error": {"message": "simulated failure", "type": "invalid_request_error",
                                             "param": None, "code": None}}, status=400)
    if body.get("model") == "strict" and "ignore_eos" in body:  # as OpenAI's own API answers
        return web.json_response({"error": {"message": "Unrecognized request argument supplied: ignore_eos",
                                             "type": "invalid_request_error", "param": None, "code": None}},
                                 status=400)
    max_tokens = int(body.get("max_tokens") or 16)
    first = sim.first_token_at(arrival)
    sim.waiting += 1
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    try:
        await _sleep_until(first)
        sim.waiting -= 1
        sim.running += 1
        for i in range(max_tokens):
            if i:
                await _sleep_until(first + i * sim.itl_s)
            await response.write(_event(_chunk(endpoint, " tok", "length" if i == max_tokens - 1 else None)))
        usage = {"prompt_tokens": len(str(prompt).split()), "completion_tokens": max_tokens,
                 "total_tokens": len(str(prompt).split()) + max_tokens}
        await response.write(_event({"object": "chunk", "model": "sim", "choices": [], "usage": usage}))
        await response.write(_event("[DONE]"))
        await response.write_eof()
    except ConnectionResetError:  # the client timed out and closed: nothing more to send
        pass
    finally:
        sim.running = max(sim.running - 1, 0)
        sim.served += 1
    return response


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completions")


async def chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def metrics(request: web.Request) -> web.Response:
    sim: Sim = request.app["sim"]
    text = "\n".join([
        "# TYPE vllm:num_requests_running gauge", f'vllm:num_requests_running{{model_name="sim"}} {sim.running}',
        "# TYPE vllm:num_requests_waiting gauge", f'vllm:num_requests_waiting{{model_name="sim"}} {sim.waiting}',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f'vllm:kv_cache_usage_perc{{model_name="sim"}} {min(sim.running / 64, 1.0)}',
        "# TYPE vllm:num_preemptions counter", 'vllm:num_preemptions_total{model_name="sim"} 0',
    ]) + "\n"
    return web.Response(text=text, content_type="text/plain")


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "sim", "object": "model"}]})


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--service-ms", type=float, default=20.0)
    parser.add_argument("--itl-ms", type=float, default=2.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    app = web.Application()
    app["sim"] = Sim(args.service_ms / 1e3, args.itl_ms / 1e3)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", lambda request: web.Response(text="ok"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"PORT {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
