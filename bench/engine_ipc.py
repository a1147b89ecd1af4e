"""The measurements behind the engine-process boundary (docs/ARCHITECTURE.md, "Output protocol").

1. Codec: one step's `StepOutputs` (B requests, one new token each, as a decode step makes) encoded
   and decoded with msgspec (MessagePack, array-like structs) and with pickle.
2. Transport: those messages streamed from a child process to this one, decoded on arrival, over
   (a) a `multiprocessing.Pipe` read with blocking `recv_bytes` and (b) the same socket read by
   asyncio with our framing (what `ProcessClient` does), and (c) ZMQ PUSH/PULL when pyzmq is
   installed (it is not a dependency; the figure is for the comparison).
3. Where detokenization and stop strings run: the cost per token of `IncrementalDetokenizer.update`
   (in the engine core today) against the cost per event of the front end's SSE chunk (a dict and
   msgspec.json), the work the server's process does per token anyway.

    python -m appliance_bench.engine_ipc [--batch 256] [--steps 400] [--tokenizer DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import pickle
import struct
import time
from typing import Any

import msgspec

from appliance.engine.messages import FromCore, StepOutputs
from appliance.engine.outputs import CompletionDelta, EngineStats, RequestDelta

_HEADER = struct.Struct("!i")


def _step_outputs(batch: int, step: int) -> StepOutputs:
    deltas = [RequestDelta(f"cmpl-{i:032x}", [CompletionDelta(0, [1000 + step], " word")], False)
              for i in range(batch)]
    stats = EngineStats(batch, 0, 10000, 3000, 10, 0.3, 0, 0, 0, 100000, 200000, step, time.monotonic())
    return StepOutputs(deltas, [], stats, True)


def _time_per_call(fn: Any, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def codec(batch: int) -> dict[str, float]:
    message = _step_outputs(batch, 1)
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(FromCore)
    packed = encoder.encode(message)
    pickled = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return {
        "msgspec_bytes": len(packed),
        "msgspec_encode_us": _time_per_call(lambda: encoder.encode(message), 200) * 1e6,
        "msgspec_decode_us": _time_per_call(lambda: decoder.decode(packed), 200) * 1e6,
        "pickle_bytes": len(pickled),
        "pickle_encode_us": _time_per_call(lambda: pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), 200) * 1e6,
        "pickle_decode_us": _time_per_call(lambda: pickle.loads(pickled), 200) * 1e6,
    }


def _sender(conn: Any, batch: int, steps: int, transport: str, address: str | None) -> None:
    encoder = msgspec.msgpack.Encoder()
    payloads = [encoder.encode(_step_outputs(batch, s)) for s in range(steps)]
    if transport == "zmq":
        import zmq

        sock = zmq.Context().socket(zmq.PUSH)
        sock.connect(address)
        for payload in payloads:
            sock.send(payload, copy=False)
        sock.send(b"")
        sock.close(linger=-1)
        return
    for payload in payloads:
        conn.send_bytes(payload)
    conn.send_bytes(b"")


def transport(batch: int, steps: int, kind: str) -> float:
    """Microseconds per step message, from the sender's first send to the last decode here."""
    ctx = multiprocessing.get_context("spawn")
    decoder = msgspec.msgpack.Decoder(FromCore)
    parent, child = ctx.Pipe()
    address = None
    if kind == "zmq":
        import zmq

        pull = zmq.Context().socket(zmq.PULL)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        address = f"tcp://127.0.0.1:{port}"
    proc = ctx.Process(target=_sender, args=(child, batch, steps, kind, address))
    proc.start()
    child.close()
    received = 0
    if kind == "pipe":
        parent.poll(None)
        start = time.perf_counter()
        while data := parent.recv_bytes():
            decoder.decode(data)
            received += 1
    elif kind == "zmq":
        pull.poll()
        start = time.perf_counter()
        while data := pull.recv(copy=False).buffer:
            decoder.decode(data)
            received += 1
    else:
        start, received = asyncio.run(_asyncio_reader(parent, decoder))
    seconds = time.perf_counter() - start
    proc.join()
    assert received == steps, (received, steps)
    return seconds / steps * 1e6


async def _asyncio_reader(conn: Any, decoder: Any) -> tuple[float, int]:
    import os
    import socket

    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    sock.setblocking(False)
    done = loop.create_future()
    state = {"count": 0, "start": 0.0}

    class Reader(asyncio.Protocol):
        buffer = bytearray()

        def data_received(self, data: bytes) -> None:
            if not state["start"]:
                state["start"] = time.perf_counter()
            buf = self.buffer
            buf += data
            pos = 0
            while len(buf) - pos >= 4:
                (size,) = _HEADER.unpack_from(buf, pos)
                if len(buf) - pos - 4 < size:
                    break
                if size == 0:
                    done.set_result(None)
                    return
                decoder.decode(bytes(buf[pos + 4 : pos + 4 + size]))
                state["count"] += 1
                pos += 4 + size
            del buf[:pos]

    transport_, _ = await loop.create_unix_connection(Reader, sock=sock)
    await done
    transport_.close()
    return state["start"], state["count"]


def detokenize_vs_event(num_tokens: int, tokenizer_dir: str | None) -> dict[str, float]:
    from appliance.engine.detokenizer import IncrementalDetokenizer
    from appliance.engine.sequence import SamplingParams, Sequence
    from appliance.models.fetch import ensure_default_model
    from appliance.models.tokenizer import load_tokenizer
    from appliance.server.responses import ChoiceDelta, TokenTexts
    from appliance.server.streaming import CompletionChunks, _event

    tokenizer = load_tokenizer(tokenizer_dir or str(ensure_default_model(progress=False)))
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away. " * 40
    ids = tokenizer.encode(text)[:num_tokens]
    out: dict[str, float] = {}
    for name, fast in (("detok_byte_level_us_per_token", True), ("detok_general_us_per_token", False),
                       ("detok_with_stop_strings_us_per_token", True)):
        detok = IncrementalDetokenizer(tokenizer, byte_level_fast_path=fast)
        stops = ["never appears", "###"] if "stop" in name else []
        seq = Sequence("r", [1, 2, 3], SamplingParams(max_tokens=num_tokens, stop=stops))
        start = time.perf_counter()
        for token in ids:
            seq.token_ids.append(token)
            detok.update(seq)
        out[name] = (time.perf_counter() - start) / len(ids) * 1e6
    builder = CompletionChunks("cmpl-x", "m", 0, TokenTexts(tokenizer), logprobs=False, include_usage=True,
                               echo_texts=None, echo_ids=None, n=1)
    delta = [ChoiceDelta(0, " word", [1234], [], None, False)]
    out["sse_event_us"] = _time_per_call(lambda: b"".join(_event(p) for p in builder.chunks(delta)), 2000) * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance_bench.engine_ipc", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="requests per step message")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the embedded default model's)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"bench": "engine-ipc", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "batch": args.batch, "steps": args.steps}
    result["codec"] = codec(args.batch)
    kinds = ["pipe", "asyncio"]
    try:
        import zmq  # noqa: F401

        kinds.append("zmq")
    except ImportError:
        pass
    result["transport_us_per_step"] = {kind: round(transport(args.batch, args.steps, kind), 1) for kind in kinds}
    result["text"] = {k: round(v, 2) for k, v in detokenize_vs_event(512, args.tokenizer).items()}
    result["codec"] = {k: round(v, 1) for k, v in result["codec"].items()}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
