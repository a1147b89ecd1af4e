"""Tile-shape sweep of the paged attention kernel: `DECODE_TILE(_FP8)` and `PREFILL_TILE` in
kernels/attention.py come from this.

Each shape is checked against the torch reference, then timed by replaying a CUDA graph of 10
launches (median of 15 replays). Decode cases: B=512 ctx=640 (a W1 decode step) and B=1
ctx=4096, bf16 and fp8 caches; prefill: 16 causal 512-token prompts (a W1 prefill chunk).

    python -m appliance_bench.tile_sweep --phase decode
    python -m appliance_bench.tile_sweep --phase prefill

`--smoke` runs one tiny shape per case on CPU under the Triton interpreter (CI keeps it working).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

HEADS = (32, 8, 128)  # Llama-3.1-8B: query heads, kv heads, head size
BLOCK_SIZE = 16


def _batch(num_seqs: int, ctx: int, q_len: int, fp8: bool, device: torch.device, heads: tuple[int, int, int]
           ) -> tuple[torch.Tensor, ...]:
    hq, hkv, d = heads
    per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = num_seqs * per_seq + 8
    gen = torch.Generator().manual_seed(num_seqs * 7 + ctx)
    k = (0.5 * torch.randn((num_blocks, BLOCK_SIZE, hkv, d), generator=gen)).to(device)
    v = (0.5 * torch.randn((num_blocks, BLOCK_SIZE, hkv, d), generator=gen)).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    q = torch.randn((num_seqs * q_len, hq, d), generator=gen).to(device=device, dtype=dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * per_seq].view(num_seqs, per_seq)
    seq_lens = torch.full((num_seqs,), ctx, dtype=torch.int32)
    qsl = torch.arange(0, num_seqs * q_len + 1, q_len, dtype=torch.int32)
    return (q, k.to(cache_dtype), v.to(cache_dtype), tables.to(torch.int32).contiguous().to(device),
            seq_lens.to(device), qsl.to(device))


def _time_us(fn: Any, device: torch.device) -> float:
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 10 * 1e3)
    return statistics.median(times)


def sweep(phase: str, smoke: bool) -> list[dict[str, Any]]:
    from appliance_kernels import attention, reference

    device = torch.device("cpu" if smoke else "cuda")
    heads = (4, 2, 32) if smoke else HEADS
    if phase == "decode":
        cases = [(4, 40, 1, False), (1, 70, 1, True)] if smoke else [
            (512, 640, 1, True), (512, 640, 1, False), (1, 4096, 1, False), (1, 4096, 1, True)]
        shapes = [(64, 4, 2)] if smoke else list(itertools.product([32, 64, 128], [2, 4, 8], [2, 3]))
    else:
        cases = [(2, 24, 24, False)] if smoke else [(16, 512, 512, False)]
        shapes = [(64, 64, 4, 2)] if smoke else list(itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3]))
    rows = []
    for num_seqs, ctx, q_len, fp8 in cases:
        q, k, v, tables, seq_lens, qsl = _batch(num_seqs, ctx, q_len, fp8, device, heads)
        scale = heads[2] ** -0.5
        want = reference.paged_attention_ref(q, k, v, tables, seq_lens, qsl, scale).float()
        table = (attention.DECODE_TILE_FP8 if fp8 else attention.DECODE_TILE) if phase == "decode" \
            else attention.PREFILL_TILE
        saved = dict(table)
        try:
            for shape in shapes:
                if phase == "decode":
                    table.update(block_n=shape[0], num_warps=shape[1], num_stages=shape[2])
                else:
                    table.update(rows=shape[0], block_n=shape[1], num_warps=shape[2], num_stages=shape[3])

                run = functools.partial(attention.paged_attention, q, k, v, tables, seq_lens, qsl, scale,
                                        max_query_len=q_len, max_seq_len=ctx, is_decode_only=q_len == 1)
                err = float((run().float() - want).norm() / want.norm())
                us = _time_us(run, device)
                kv_bytes = num_seqs * ctx * heads[1] * heads[2] * 2 * k.element_size()
                flops = 4 * heads[0] * heads[2] * num_seqs * q_len * (ctx - q_len / 2)
                row = {"phase": phase, "num_seqs": num_seqs, "ctx": ctx, "q_len": q_len, "fp8_kv": fp8,
                       "tile": dict(table), "us": us, "tb_s": kv_bytes / us / 1e6, "tflop_s": flops / us / 1e6,
                       "rel_err": err}
                rows.append(row)
                print(f"B={num_seqs:4d} ctx={ctx:5d} q={q_len:4d} fp8={int(fp8)} {table}: {us:9.1f} us "
                      f"{row['tb_s']:5.2f} TB/s {row['tflop_s']:6.1f} TFLOP/s err {err:.1e}", flush=True)
        finally:
            table.update(saved)
    return rows


def main(argv: list[str] | None = None) -> int:
    from appliance_bench.results import write_result

    parser = argparse.ArgumentParser(prog="python -m appliance_bench.tile_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["decode", "prefill"], default="decode")
    parser.add_argument("--results-dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="one tiny shape per case, CPU, Triton interpreter")
    args = parser.parse_args(argv)
    if args.smoke and not os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("--smoke needs TRITON_INTERPRET=1 set before the kernels are imported")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("the tile sweep needs a CUDA GPU (or --smoke on CPU)")
    rows = sweep(args.phase, args.smoke)
    kind = f"tile-sweep-{args.phase}" + ("-smoke" if args.smoke else "")
    print("wrote", write_result({"benchmark": "paged attention tile sweep", "rows": rows}, kind, args.results_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
