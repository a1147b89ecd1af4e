"""Microbenchmarks: each Triton kernel against its torch reference, at Llama-3.1-8B shapes.

Reports median time (CUDA events through triton.testing.do_bench, which flushes L2 between runs),
the bytes each kernel must move at least, and the achieved bandwidth against the measured copy rate
of the H100 (3.02 TB/s); prefill attention also reports TFLOP/s. `--smoke` runs tiny shapes on CPU
under the Triton interpreter so the script cannot rot in CI.

    python -m appliance_bench.kernels [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import ModuleType

import torch

H100_COPY_BYTES_PER_S = 3.02e12
H100_MATMUL_FLOPS_PER_S = 786e12


@dataclass
class KernelTiming:
    kernel: str
    case: str
    triton_ms: float
    torch_ms: float | None
    min_bytes: int
    flops: float
    bandwidth_tb_s: float  # min_bytes / triton time
    bandwidth_frac: float  # of the copy ceiling
    speedup_vs_torch: float | None


def _median_ms(fn: Callable[[], object], device: torch.device, smoke: bool) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(1 if smoke else 3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _kernels() -> dict[str, ModuleType]:
    # Imported late: on CPU, TRITON_INTERPRET must be set before the @triton.jit definitions run.
    from appliance_kernels import activation, attention, norm, reference, rotary, rotary_kv

    return {"activation": activation, "attention": attention, "norm": norm, "reference": reference, "rotary": rotary,
            "rotary_kv": rotary_kv}


def make_paged_batch(q_lens: list[int], ctx_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
                     block_size: int, dtype: torch.dtype, device: torch.device) -> dict[str, object]:
    """A paged batch with each sequence's blocks scattered over the cache (random block order)."""
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq)
    order = torch.randperm(num_blocks)
    tables = torch.zeros((len(q_lens), max(blocks_per_seq)), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = order[used:used + n]
        used += n
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return {
        "q": torch.randn((starts[-1], num_q_heads, head_dim), dtype=dtype, device=device),
        "k_cache": torch.randn(shape, dtype=dtype, device=device),
        "v_cache": torch.randn(shape, dtype=dtype, device=device),
        "block_tables": tables.to(device),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
        "query_start_loc": torch.tensor(starts, dtype=torch.int32, device=device),
        "max_query_len": max(q_lens),
        "max_seq_len": max(seq_lens),
    }


def _timing(kernel: str, case: str, triton_ms: float, torch_ms: float | None, min_bytes: int,
            flops: float = 0.0) -> KernelTiming:
    bw = min_bytes / (triton_ms / 1e3) / 1e12
    return KernelTiming(kernel, case, triton_ms, torch_ms, min_bytes, flops, bw, bw * 1e12 / H100_COPY_BYTES_PER_S,
                        None if torch_ms is None else torch_ms / triton_ms)


def bench_attention(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[KernelTiming]:
    k = _kernels()
    hq, hkv, d, bs = (4, 2, 32, 16) if smoke else (32, 8, 128, 16)
    cases = {
        "decode B=256 ctx=1024": ([1] * 256, [1023] * 256),
        "decode B=1 ctx=4096 (split-KV)": ([1], [4095]),
        "decode B=1 ctx=4096 (no split)": ([1], [4095]),
        "prefill 4x1024 fresh": ([1024] * 4, [0] * 4),
        "mixed 64 decode + 512 chunk @1024": ([1] * 64 + [512], [1023] * 64 + [1024]),
        # fp8 (e4m3) KV cache: half the K/V bytes of the first row.
        "decode B=256 ctx=1024 fp8 KV": ([1] * 256, [1023] * 256),
        "decode B=512 ctx=640 fp8 KV": ([1] * 512, [639] * 512),
        "decode B=512 ctx=640": ([1] * 512, [639] * 512),
    }
    if smoke:
        cases = {"decode B=4 ctx=64": ([1] * 4, [63] * 4), "mixed 2 decode + 8 chunk": ([1, 1, 8], [20, 9, 16]),
                 "decode B=4 ctx=64 fp8 KV": ([1] * 4, [63] * 4)}
    out: list[KernelTiming] = []
    for name, (q_lens, ctx_lens) in cases.items():
        batch = make_paged_batch(q_lens, ctx_lens, hq, hkv, d, bs, dtype, device)
        elem = kv_elem = torch.finfo(dtype).bits // 8
        if "fp8" in name:
            batch["k_cache"] = batch["k_cache"].to(torch.float8_e4m3fn)
            batch["v_cache"] = batch["v_cache"].to(torch.float8_e4m3fn)
            kv_elem = 1
        scale = d**-0.5
        args = (batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"], batch["seq_lens"],
                batch["query_start_loc"], scale)
        attn = k["attention"]
        if "no split" in name:
            run = functools.partial(attn.paged_attention_with_splits, *args, max_query_len=1, num_splits=1)
        else:
            run = functools.partial(attn.paged_attention, *args, max_query_len=batch["max_query_len"],
                                    max_seq_len=batch["max_seq_len"])
        triton_ms = _median_ms(run, device, smoke)
        torch_ms = _median_ms(functools.partial(k["reference"].paged_attention_ref, *args), device, smoke)
        kv_tokens = sum(c + q for c, q in zip(ctx_lens, q_lens, strict=True))
        q_tokens = sum(q_lens)
        min_bytes = 2 * kv_tokens * hkv * d * kv_elem + 2 * q_tokens * hq * d * elem
        # Causal FLOPs: query i of a row with c cached tokens sees c + i + 1 keys.
        flops = sum(4.0 * hq * d * (q * c + q * (q + 1) / 2) for q, c in zip(q_lens, ctx_lens, strict=True))
        out.append(_timing("paged_attention", name, triton_ms, torch_ms, min_bytes, flops))
    return out


def bench_layers(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[KernelTiming]:
    k = _kernels()
    ref = k["reference"]
    t, h, inter, hq, hkv, d = (8, 64, 96, 4, 2, 32) if smoke else (4096, 4096, 14336, 32, 8, 128)
    elem = torch.finfo(dtype).bits // 8
    out: list[KernelTiming] = []

    x = torch.randn((t, h), dtype=dtype, device=device)
    res = torch.randn((t, h), dtype=dtype, device=device)
    w = torch.randn(h, dtype=dtype, device=device)
    out.append(_timing("rms_norm", f"T={t} H={h} +residual",
                       _median_ms(lambda: k["norm"].rms_norm(x, w, 1e-5, res), device, smoke),
                       _median_ms(lambda: ref.rms_norm_ref(x, w, 1e-5, res), device, smoke), 4 * t * h * elem))

    gate_up = torch.randn((t, 2 * inter), dtype=dtype, device=device)
    out.append(_timing("silu_and_mul", f"T={t} I={inter}",
                       _median_ms(lambda: k["activation"].silu_and_mul(gate_up), device, smoke),
                       _median_ms(lambda: ref.silu_and_mul_ref(gate_up), device, smoke), 3 * t * inter * elem))

    q = torch.randn((t, hq, d), dtype=dtype, device=device)
    kk = torch.randn((t, hkv, d), dtype=dtype, device=device)
    positions = torch.randint(0, 4096, (t,), device=device)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    freqs = torch.outer(torch.arange(4096, dtype=torch.float32, device=device), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    out.append(_timing("rotary_embedding", f"T={t} Hq={hq} Hkv={hkv} D={d}",
                       _median_ms(lambda: k["rotary"].rotary_embedding(positions, q, kk, cos_sin), device, smoke),
                       _median_ms(lambda: ref.rotary_ref(positions, q, kk, cos_sin), device, smoke),
                       2 * t * (hq + hkv) * d * elem + t * d * 4))

    num_blocks, bs = -(-t // 16) * 2, 16
    k_cache = torch.zeros((num_blocks, bs, hkv, d), dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    v = torch.randn_like(kk)
    slots = torch.randperm(num_blocks * bs, device=device)[:t]
    out.append(_timing("store_kv", f"T={t} Hkv={hkv} D={d}",
                       _median_ms(lambda: k["attention"].store_kv(kk, v, k_cache, v_cache, slots), device, smoke),
                       _median_ms(lambda: ref.store_kv_ref(kk, v, k_cache, v_cache, slots), device, smoke),
                       4 * t * hkv * d * elem))

    # Fused rotary + KV write: reads q, k, v, writes rotated q and the k/v cache rows (one launch).
    # The T=1 rows are batch-1 decode, where the launches themselves are the cost.
    vv = torch.randn_like(kk)
    fp8_k_cache, fp8_v_cache = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
    for tokens in (t, 1):
        sl, pos = slots[:tokens], positions[:tokens]
        qs, ks, vs = q[:tokens], kk[:tokens], vv[:tokens]
        moved = 2 * tokens * (hq + 2 * hkv) * d * elem + tokens * d * 4
        for cache_name, kc, vc in (("", k_cache, v_cache), (" fp8 KV", fp8_k_cache, fp8_v_cache)):
            out.append(_timing("rotary_store_kv", f"T={tokens} Hq={hq} Hkv={hkv} D={d}{cache_name}",
                               _median_ms(lambda qs=qs, ks=ks, vs=vs, kc=kc, vc=vc, sl=sl, pos=pos:
                                          k["rotary_kv"].rotary_store_kv(pos, qs, ks, vs, kc, vc, sl, cos_sin),
                                          device, smoke),
                               _median_ms(lambda qs=qs, ks=ks, vs=vs, kc=kc, vc=vc, sl=sl, pos=pos:
                                          ref.rotary_store_kv_ref(pos, qs, ks, vs, kc, vc, sl, cos_sin),
                                          device, smoke), moved))

        def separate(qs: torch.Tensor = qs, ks: torch.Tensor = ks, vs: torch.Tensor = vs, sl: torch.Tensor = sl,
                     pos: torch.Tensor = pos) -> None:
            q_rot, k_rot = k["rotary"].rotary_embedding(pos, qs, ks, cos_sin)
            k["attention"].store_kv(k_rot, vs, k_cache, v_cache, sl)

        out.append(_timing("rotary + store_kv", f"T={tokens} (two launches, for the fused rows)",
                           _median_ms(separate, device, smoke), None, moved))
    return out


def run_kernel_benchmarks(device: torch.device, smoke: bool) -> list[KernelTiming]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    return bench_layers(device, dtype, smoke) + bench_attention(device, dtype, smoke)


def format_table(rows: list[KernelTiming]) -> str:
    lines = [f"{'kernel':<18} {'case':<36} {'triton ms':>10} {'torch ms':>10} {'x torch':>8} {'TB/s':>6} "
             f"{'% copy':>7} {'TFLOP/s':>8}"]
    for r in rows:
        torch_ms = f"{r.torch_ms:10.4f}" if r.torch_ms is not None else f"{'-':>10}"
        speedup = f"{r.speedup_vs_torch:8.1f}" if r.speedup_vs_torch is not None else f"{'-':>8}"
        tflops = r.flops / (r.triton_ms / 1e3) / 1e12 if r.flops else 0.0
        lines.append(f"{r.kernel:<18} {r.case:<36} {r.triton_ms:10.4f} {torch_ms} {speedup} {r.bandwidth_tb_s:6.2f} "
                     f"{100 * r.bandwidth_frac:6.1f}% {tflops:8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: Triton interpreter)")
    parser.add_argument("--json", help="write the timings here as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.smoke = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run_kernel_benchmarks(device, args.smoke)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
