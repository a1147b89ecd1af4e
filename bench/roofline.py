"""Roofline of a decoder LLM: FLOPs and bytes counted from its shape, ceilings measured on the device.

The two ceilings are measured in the same run as the workload (a large device-to-device copy,
counting bytes read plus written; a large bf16 matrix product), because the datasheet rates are
only leads. Counting: every weight is read once per forward step; each token costs 2 FLOPs per
weight (plus attention); attention reads each sequence's K/V context once per step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """The shape numbers of a Llama-family decoder that the roofline needs."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    dtype_bytes: int = 2

    @property
    def matmul_params(self) -> int:
        """Weights touched by matrix products per token (the LM head included, embeddings excluded)."""
        h, q, kv = self.hidden_size, self.num_q_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size
        return self.num_layers * per_layer + self.vocab_size * h

    @property
    def weight_bytes(self) -> int:
        embed = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return (self.matmul_params + embed + norms) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def attention_flops(self, query_tokens: int, context_tokens: int) -> float:
        """QK^T and PV over `context_tokens` keys for `query_tokens` queries, all layers."""
        return 4.0 * self.num_layers * self.num_q_heads * self.head_dim * query_tokens * context_tokens


LLAMA_3_1_8B = ModelShape("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128, 128256)
SMOLLM2_135M = ModelShape("smollm2-135m", 576, 1536, 30, 9, 3, 64, 49152, tie_word_embeddings=True)
SHAPES = {s.name: s for s in (LLAMA_3_1_8B, SMOLLM2_135M)}


def workload_floor_s(shape: ModelShape, num_requests: int, prompt_tokens: int, output_tokens: int,
                     max_batch: int, copy_bytes_per_s: float, matmul_flops_per_s: float) -> dict[str, float]:
    """Lower bounds on the time of `num_requests` requests run `max_batch` at a time.

    Compute: every prompt and output token through every weight, plus causal attention.
    Memory: the weights once per decode step (decode steps = output_tokens per wave of requests), plus
    each decode step's K/V context read once.
    """
    total_tokens = num_requests * (prompt_tokens + output_tokens)
    flops = 2.0 * shape.matmul_params * total_tokens
    # Causal attention: a token at position p attends to p + 1 keys; sum over 0..L-1 is L(L+1)/2.
    seq_len = prompt_tokens + output_tokens
    flops += num_requests * shape.attention_flops(1, 1) * seq_len * (seq_len + 1) / 2
    waves = -(-num_requests // max_batch)
    decode_steps = waves * output_tokens
    # Mean context of a decode step: prompt + half the outputs.
    kv_read = num_requests * output_tokens * (prompt_tokens + output_tokens / 2) * shape.kv_bytes_per_token
    bytes_moved = decode_steps * shape.weight_bytes + kv_read
    compute_s = flops / matmul_flops_per_s
    memory_s = bytes_moved / copy_bytes_per_s
    return {"flops": flops, "bytes": bytes_moved, "compute_s": compute_s, "memory_s": memory_s,
            "floor_s": max(compute_s, memory_s)}


def time_device_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeat: int = 10) -> float:
    """Median milliseconds of fn(): CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_copy_bytes_per_s(device: torch.device, num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_device_ms(lambda: dst.copy_(src), device)
    return 2 * num_bytes / (ms / 1e3)


def measure_matmul_flops_per_s(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """A square matrix product on random data (zeros run faster than real data)."""
    a = torch.randn((n, n), device=device, dtype=dtype)
    b = torch.randn((n, n), device=device, dtype=dtype)
    ms = time_device_ms(lambda: a @ b, device)
    return 2.0 * n**3 / (ms / 1e3)


def shape_from_hf_dict(name: str, config: dict[str, object], dtype_bytes: int) -> ModelShape:
    """A ModelShape from an HF config.json-style dict (the engine's dummy architectures)."""
    hidden = int(config["hidden_size"])  # type: ignore[arg-type]
    heads = int(config["num_attention_heads"])  # type: ignore[arg-type]
    return ModelShape(
        name=name, hidden_size=hidden, intermediate_size=int(config["intermediate_size"]),  # type: ignore[arg-type]
        num_layers=int(config["num_hidden_layers"]),  # type: ignore[arg-type]
        num_q_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),  # type: ignore[arg-type]
        head_dim=int(config.get("head_dim") or hidden // heads),  # type: ignore[arg-type]
        vocab_size=int(config["vocab_size"]),  # type: ignore[arg-type]
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), dtype_bytes=dtype_bytes,
    )
