"""`vllm bench serve`'s definitions (vLLM 0.26.0), written here as a reference from reading
vllm/benchmarks/lib/endpoint_request_func.py and calculate_metrics in vllm/benchmarks/serve.py (read,
not copied): one request's stream as vLLM's completions client reads it, a run's figures as
vLLM computes them, and the result document `vllm bench serve --save-result --save-detailed`
writes. Imported by the tests as `vllm_reference` (conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def count_words(text: str) -> int:
    """A stand-in tokenizer both sides use when the server sends no usage."""
    return len(text.split())


@dataclass
class Stream:
    """One request as the wire delivers it: sent at `start`, then (timestamp, payload) pairs."""

    start: float
    events: list[tuple[float, str]] = field(default_factory=list)
    prompt_len: int = 0  # the client's own count of the prompt
    http_status: int = 200


def token(t: float, text: str, finish: str | None = None) -> tuple[float, str]:
    return t, json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})


def usage(t: float, prompt: int, completion: int) -> tuple[float, str]:
    return t, json.dumps({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}})


def done(t: float) -> tuple[float, str]:
    return t, "[DONE]"


# --- vLLM's definitions, as a reference -------------------------------------------------------

@dataclass
class VllmOutput:
    success: bool = False
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    prompt_len: int = 0
    text: str = ""


def vllm_request(s: Stream) -> VllmOutput:
    out = VllmOutput(prompt_len=s.prompt_len)
    if s.http_status != 200:
        return out
    last = s.start
    first = True
    for t, payload in s.events:
        if payload == "[DONE]":
            continue
        data = json.loads(payload)
        if data.get("choices"):
            if first:
                out.ttft, first = t - s.start, False
            else:
                out.itl.append(t - last)
            last = t
            out.text += data["choices"][0].get("text") or ""
        elif data.get("usage"):
            out.output_tokens = data["usage"].get("completion_tokens")
            if data["usage"].get("prompt_tokens") is not None:
                out.prompt_len = data["usage"]["prompt_tokens"]
    out.success = not first
    out.latency = last - s.start
    return out


def vllm_metrics(outputs: list[VllmOutput], duration: float, percentiles: list[float]) -> dict[str, float]:
    ttfts, tpots, itls, e2els, out_lens = [], [], [], [], []
    total_in = completed = 0
    for o in outputs:
        if not o.success:
            continue
        n = o.output_tokens or count_words(o.text)
        out_lens.append(n)
        total_in += o.prompt_len
        if n > 1:
            tpots.append((o.latency - o.ttft) / (n - 1))
        itls += o.itl
        ttfts.append(o.ttft)
        e2els.append(o.latency)
        completed += 1
    res = {"completed": completed, "failed": len(outputs) - completed, "total_input_tokens": total_in,
           "total_output_tokens": sum(out_lens), "request_throughput": completed / duration,
           "output_throughput": sum(out_lens) / duration,
           "total_token_throughput": (total_in + sum(out_lens)) / duration}
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        res[f"mean_{name}_ms"] = float(np.mean(values or 0)) * 1e3
        res[f"median_{name}_ms"] = float(np.median(values or 0)) * 1e3
        res[f"std_{name}_ms"] = float(np.std(values or 0)) * 1e3
        for p in percentiles:
            res[f"p{p:g}_{name}_ms"] = float(np.percentile(values or 0, p)) * 1e3
    return res


def vllm_result_doc(streams: list[Stream], duration: float, percentiles: list[float]) -> dict[str, Any]:
    """What `vllm bench serve --save-result --save-detailed --percentile-metrics ttft,tpot,itl,e2el`
    writes for these streams (the keys the cross-check reads)."""
    outputs = [vllm_request(s) for s in streams]
    doc: dict[str, Any] = {"duration": duration, **vllm_metrics(outputs, duration, percentiles)}
    doc["input_lens"] = [o.prompt_len for o in outputs]
    doc["output_lens"] = [(o.output_tokens or count_words(o.text)) if o.success else 0 for o in outputs]
    doc["ttfts"] = [o.ttft for o in outputs]
    doc["itls"] = [o.itl for o in outputs]
    doc["start_times"] = [s.start for s in streams]
    doc["errors"] = ["" if o.success else "Service Unavailable" for o in outputs]
    return doc
