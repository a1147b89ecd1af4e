"""The kernel microbenchmark and the one-call GPU check, at tiny shapes on CPU (Triton interpreter).

Speed is not measured here; these keep the GPU scripts runnable, and the GPU check's correctness
pass must find every kernel within tolerance even at its smoke sizes.
"""

from __future__ import annotations

import torch
from appliance_bench import gpu_check, kernels

CPU = torch.device("cpu")


def test_kernel_microbench_smoke_times_every_kernel() -> None:
    rows = kernels.run_kernel_benchmarks(CPU, smoke=True)
    assert {r.kernel for r in rows} == {"rms_norm", "silu_and_mul", "rotary_embedding", "store_kv", "paged_attention",
                                        "rotary_store_kv", "rotary + store_kv"}
    assert all(r.triton_ms > 0 and r.min_bytes > 0 for r in rows)
    assert "paged_attention" in kernels.format_table(rows)


def test_gpu_check_correctness_pass_at_smoke_sizes() -> None:
    checks = gpu_check.check_attention(CPU, [torch.float32], smoke=True)
    checks += gpu_check.check_layers(CPU, [torch.float32], smoke=True)
    assert {c["kernel"] for c in checks} >= {"paged_attention", "rms_norm", "silu_and_mul", "rotary q", "store_kv",
                                             "paged_attention fp8 KV", "rotary_store_kv q", "rotary_store_kv k cache"}
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
