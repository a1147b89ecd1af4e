"""Long-context benchmark (issue 13): prefill attention at 8k-32k context against the bf16 matmul
rate, split-KV decode at long context against the copy rate, and the engine with the Llama-3.1-8B
shape at max_model_len 131072. One command writes one JSON (to $OUT when set):

    python -m appliance_bench.longctx                    # kernels + engine, ~6 min on an H100/H200
    python -m appliance_bench.longctx --phase kernels    # the sweep only
    python -m appliance_bench.longctx --smoke            # CPU, Triton interpreter, tiny shapes (CI)

Kernels: each prefill case (one sequence: a chunk of `q` new tokens after `ctx` cached ones, the
8B's 32/8/128 heads, block size 16) runs the mixed-batch kernel (kernels/attention.py, the
production path today) and the Hopper-shaped prefill kernel (kernels/prefill_attention.py) with
every tile of its SWEEP_TILES, each checked against the torch reference first; TFLOP/s count the
causal FLOPs only (4 * Hq * D * q * (ctx + q / 2)). Decode cases read ctx keys per sequence; TB/s
count the K/V bytes read. Timing: a CUDA graph of 10 launches, median of 15 replays.

Engine: max_model_len 131072 must be accepted (KV blocks for one full sequence), then one
32k-token prompt alone (TTFT, TPOT over 64 tokens) and 32 x 8k + 8 x 32k prompts at once (-> 64
tokens each, total tok/s), with the prefill kernel switch off and on
(`LONG_PREFILL_MIN_QUERY_TOKENS`).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

HEADS = (32, 8, 128)  # Llama-3.1-8B: query heads, kv heads, head size
BLOCK_SIZE = 16
PREFILL_CASES = [(8192, 0), (8192, 8192), (8192, 24576), (2048, 30720)]  # (new tokens, cached before)
DECODE_CASES = [(1, 32768, None), (1, 131072, None), (8, 32768, None), (64, 16384, None), (1, 32768, 4096)]
SMOKE_PREFILL = [(24, 0), (13, 70)]
SMOKE_DECODE = [(1, 90, None), (2, 60, 16)]


def _batch(num_seqs: int, q_len: int, ctx: int, device: torch.device, heads: tuple[int, int, int],
           dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    hq, hkv, d = heads
    seq_len = ctx + q_len
    per_seq = -(-seq_len // BLOCK_SIZE)
    num_blocks = num_seqs * per_seq + 4
    gen = torch.Generator(device=device).manual_seed(seq_len * 31 + num_seqs)
    k = (0.5 * torch.randn((num_blocks, BLOCK_SIZE, hkv, d), generator=gen, device=device)).to(dtype)
    v = (0.5 * torch.randn((num_blocks, BLOCK_SIZE, hkv, d), generator=gen, device=device)).to(dtype)
    q = torch.randn((num_seqs * q_len, hq, d), generator=gen, device=device).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen, device=device)[: num_seqs * per_seq].view(num_seqs, per_seq)
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device)
    qsl = torch.arange(0, num_seqs * q_len + 1, q_len, dtype=torch.int32, device=device)
    return q, k, v, tables.to(torch.int32).contiguous(), seq_lens, qsl


def _repage(args: tuple[torch.Tensor, ...], block_size: int) -> tuple[torch.Tensor, ...]:
    """The same one-sequence batch over pages of `block_size` tokens (for TMA tiles: whole key tiles
    per page)."""
    q, k, v, tables, seq_lens, qsl = args
    seq_len, old = int(seq_lens[0]), k.shape[1]
    pages = -(-seq_len // block_size)
    new = []
    for cache in (k, v):
        rows = cache[tables[0, : -(-seq_len // old)].long()].reshape(-1, *cache.shape[2:])[:seq_len]
        paged = torch.zeros((pages + 1, block_size, *cache.shape[2:]), dtype=cache.dtype, device=cache.device)
        paged.view(-1, *cache.shape[2:])[:seq_len] = rows
        new.append(paged)
    new_tables = torch.arange(pages, dtype=torch.int32, device=q.device).view(1, pages)
    return q, new[0], new[1], new_tables, seq_lens, qsl


def _time_us(fn: Any, device: torch.device, launches: int = 10) -> float:
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / launches * 1e3)
    return statistics.median(times)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def _prefill_case(q_len: int, ctx: int, device: torch.device, heads: tuple[int, int, int], dtype: torch.dtype,
                  tiles: list[dict[str, int]], matmul_flops_per_s: float) -> list[dict[str, Any]]:
    from appliance_kernels import attention, reference

    args = _batch(1, q_len, ctx, device, heads, dtype)
    scale = heads[2] ** -0.5
    flops = 4 * heads[0] * heads[2] * q_len * (ctx + q_len / 2)
    runs: list[tuple[str, dict[str, int], Any]] = [("mixed-batch kernel", dict(attention.PREFILL_TILE), functools.partial(
        attention.paged_attention, *args, scale, max_query_len=q_len, max_seq_len=ctx + q_len))]
    runs += [("prefill kernel", tile, functools.partial(attention.paged_prefill_attention, *args, scale,
                                                        max_query_len=q_len, tile=tile)) for tile in tiles]
    # 64-token pages: the gather path and TMA boxes (`cache.block_size = 64` in the engine).
    paged64 = _repage(args, 64 if not smoke_tiles(tiles) else 16)
    for tile in tma_tiles(tiles):
        for use_tma in (0, 1):
            t = {**tile, "tma": use_tma, "block_size": paged64[1].shape[1]}
            runs.append(("prefill kernel", t, functools.partial(
                attention.paged_prefill_attention, *paged64, scale, max_query_len=q_len,
                tile={key: val for key, val in t.items() if key != "block_size"})))
    # NOTE: the torch reference materialises [Hq, q, ctx + q] fp32 scores (GQA runs SDPA's math
    # path): 8.6 GB at 8k x 8k, 34 GB at 8k x 32k. Past 8k x 8k the mixed-batch kernel, checked
    # against the reference by gpu_check and the GPU test suite, is the reference instead.
    if q_len * (ctx + q_len) <= 8192 * 8192:
        want, checked_against = reference.paged_attention_ref(*args, scale).float(), "torch reference"
    else:
        want, checked_against = runs[0][2]().float(), "mixed-batch kernel"
    rows = []
    for kernel, tile, run in runs:
        try:
            err = _rel_err(run(), want)
            us = _time_us(run, device) if err <= 2e-2 else float("nan")  # a wrong kernel is not timed
        except Exception as exc:  # a tile past the GPU's shared memory or registers: record, go on
            if device.type != "cuda":
                raise
            rows.append({"phase": "prefill", "q_len": q_len, "ctx": ctx, "kernel": kernel, "tile": tile,
                         "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            print(f"prefill q={q_len:5d} ctx={ctx:6d} {kernel:18s} {tile}: failed: {type(exc).__name__}", flush=True)
            continue
        row = {"phase": "prefill", "q_len": q_len, "ctx": ctx, "kernel": kernel, "tile": tile, "us": us,
               "tflop_s": flops / us / 1e6, "of_matmul": flops / us / 1e6 / (matmul_flops_per_s / 1e12),
               "rel_err": err, "checked_against": checked_against}
        rows.append(row)
        print(f"prefill q={q_len:5d} ctx={ctx:6d} {kernel:18s} {tile}: {us:10.1f} us "
              f"{row['tflop_s']:6.1f} TFLOP/s ({row['of_matmul']:.0%} of matmul) err {err:.1e}", flush=True)
    return rows


def smoke_tiles(tiles: list[dict[str, int]]) -> bool:
    return all(tile["rows"] <= 16 for tile in tiles)


def tma_tiles(tiles: list[dict[str, int]]) -> list[dict[str, int]]:
    """The tiles tried with 64-token pages, with and without TMA (the first two of the sweep)."""
    return [{k: v for k, v in tile.items() if k != "tma"} for tile in tiles[:2]]


def bench_prefill(device: torch.device, smoke: bool, matmul_flops_per_s: float) -> list[dict[str, Any]]:
    from appliance_kernels import prefill_attention

    heads = (4, 2, 32) if smoke else HEADS
    dtype = torch.float32 if smoke else torch.bfloat16
    tiles = [{"rows": 16, "block_n": 16, "num_warps": 4, "num_stages": 2}] if smoke else prefill_attention.SWEEP_TILES
    rows = []
    for q_len, ctx in SMOKE_PREFILL if smoke else PREFILL_CASES:
        rows += _prefill_case(q_len, ctx, device, heads, dtype, tiles, matmul_flops_per_s)
    return rows


def _decode_case(num_seqs: int, ctx: int, window: int | None, device: torch.device, heads: tuple[int, int, int],
                 dtype: torch.dtype, copy_bytes_per_s: float) -> dict[str, Any]:
    from appliance_kernels import attention, reference

    args = _batch(num_seqs, 1, ctx - 1, device, heads, dtype)
    scale = heads[2] ** -0.5
    want = reference.paged_attention_ref(*args, scale, sliding_window=window).float()
    run = functools.partial(attention.paged_attention, *args, scale, max_query_len=1, max_seq_len=ctx,
                            is_decode_only=True, sliding_window=window)
    err = _rel_err(run(), want)
    us = _time_us(run, device)
    keys = min(ctx, window or ctx)
    kv_bytes = num_seqs * keys * heads[1] * heads[2] * 2 * args[1].element_size()
    splits = attention.choose_num_splits(num_seqs, heads[1], keys, device)
    row = {"phase": "decode", "num_seqs": num_seqs, "ctx": ctx, "sliding_window": window, "num_splits": splits,
           "us": us, "tb_s": kv_bytes / us / 1e6, "of_copy": kv_bytes / (us / 1e6) / copy_bytes_per_s,
           "rel_err": err}
    print(f"decode B={num_seqs:3d} ctx={ctx:6d} window={window} splits={splits}: {us:9.1f} us "
          f"{row['tb_s']:5.2f} TB/s ({row['of_copy']:.0%} of copy) err {err:.1e}", flush=True)
    # Few long rows: would more partitions than choose_num_splits allows (_MAX_SPLITS) read faster?
    row["splits_sweep"] = {}
    for num_splits in (4, 16, 32, 64) if num_seqs <= 8 and device.type == "cuda" else ():
        run_n = functools.partial(attention.paged_attention_with_splits, *args, scale, max_query_len=1,
                                  num_splits=num_splits, sliding_window=window)
        err_n = _rel_err(run_n(), want)
        us_n = _time_us(run_n, device)
        row["splits_sweep"][num_splits] = {"us": us_n, "tb_s": kv_bytes / us_n / 1e6, "rel_err": err_n}
        print(f"    num_splits={num_splits:3d}: {us_n:9.1f} us {kv_bytes / us_n / 1e6:5.2f} TB/s err {err_n:.1e}",
              flush=True)
    return row


def bench_decode(device: torch.device, smoke: bool, copy_bytes_per_s: float) -> list[dict[str, Any]]:
    heads = (4, 2, 32) if smoke else HEADS
    dtype = torch.float32 if smoke else torch.bfloat16
    return [_decode_case(num_seqs, ctx, window, device, heads, dtype, copy_bytes_per_s)
            for num_seqs, ctx, window in (SMOKE_DECODE if smoke else DECODE_CASES)]


def bench_engine(smoke: bool) -> dict[str, Any]:
    """max_model_len 131072 accepted; TTFT/TPOT of one 32k prompt; 32 x 8k + 8 x 32k at once; each
    with the prefill kernel switch off, then on."""
    from appliance_bench.offline import _sampling
    from appliance_kernels import attention

    from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from appliance.engine.llm_engine import EngineCore

    model = "tiny-llama" if smoke else "llama-3.1-8b"
    max_model_len = 2048 if smoke else 131072
    long_len, short_len, out_tokens = (600, 200, 4) if smoke else (32768, 8192, 64)
    mix = (2, 1) if smoke else (32, 8)
    t0 = time.perf_counter()
    engine = EngineCore(EngineConfig(
        model=ModelConfig(model=model, load_format="dummy", dtype="float32" if smoke else "bfloat16",
                          device="cpu" if smoke else "cuda"),
        cache=CacheConfig(cpu_kv_cache_bytes=256 << 20),
        scheduler=SchedulerConfig(max_model_len=max_model_len),
    ), stream_outputs=True)
    result: dict[str, Any] = {"model": model, "max_model_len": engine.max_model_len,
                              "num_kv_blocks": engine.runner.num_kv_blocks, "startup_s": time.perf_counter() - t0}
    assert engine.max_model_len == max_model_len, f"max_model_len cut to {engine.max_model_len}"
    saved = attention.LONG_PREFILL_MIN_QUERY_TOKENS
    try:
        for switch in (None, 16 if smoke else 1024):
            attention.LONG_PREFILL_MIN_QUERY_TOKENS = switch
            label = "prefill kernel" if switch else "mixed-batch kernel"
            prompt = [(i * 7919) % 1000 + 10 for i in range(long_len)]
            engine.add_request(f"alone-{switch}", prompt, _sampling(out_tokens))
            start = time.perf_counter()
            first = None
            while engine.has_unfinished_requests():
                outputs = engine.step()
                if first is None and outputs and outputs[0].outputs[0].token_ids:
                    first = time.perf_counter()
            done = time.perf_counter()
            assert first is not None
            alone = {"ttft_s": first - start, "tpot_ms": (done - first) / max(1, out_tokens - 1) * 1e3}
            lens = [short_len] * mix[0] + [long_len] * mix[1]
            start = time.perf_counter()
            for i, n in enumerate(lens):
                engine.add_request(f"mix-{switch}-{i}", [(i * 31 + j * 7) % 1000 + 10 for j in range(n)],
                                   _sampling(out_tokens))
            while engine.has_unfinished_requests():
                engine.step()
            elapsed = time.perf_counter() - start
            total = sum(lens) + out_tokens * len(lens)
            batch = {"prompts": f"{mix[0]} x {short_len} + {mix[1]} x {long_len}", "time_s": elapsed,
                     "total_tok_s": total / elapsed, "output_tok_s": out_tokens * len(lens) / elapsed}
            result[label] = {"alone_32k": alone, "batch": batch}
            print(f"engine {label}: 32k alone TTFT {alone['ttft_s']:.2f} s TPOT {alone['tpot_ms']:.2f} ms; "
                  f"batch {batch['prompts']}: {batch['total_tok_s']:.0f} total tok/s", flush=True)
    finally:
        attention.LONG_PREFILL_MIN_QUERY_TOKENS = saved
    return result


def main(argv: list[str] | None = None) -> int:
    from appliance_bench.results import write_result
    from appliance_bench.roofline import measure_copy_bytes_per_s, measure_matmul_flops_per_s

    parser = argparse.ArgumentParser(prog="python -m appliance_bench.longctx", description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["kernels", "engine", "all"], default="all")
    parser.add_argument("--results-dir", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    args = parser.parse_args(argv)
    if args.smoke and not os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("--smoke needs TRITON_INTERPRET=1 set before the kernels are imported")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("the long-context benchmark needs a CUDA GPU (or --smoke on CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")
    payload: dict[str, Any] = {"benchmark": "long context (issue 13)"}
    kind = "longctx" + ("-smoke" if args.smoke else "") + ("" if args.phase == "all" else f"-{args.phase}")
    if args.phase in ("kernels", "all"):
        matmul = 1e12 if args.smoke else measure_matmul_flops_per_s(device)
        copy = 1e9 if args.smoke else measure_copy_bytes_per_s(device)
        payload["ceilings"] = {"matmul_tflop_s": matmul / 1e12, "copy_tb_s": copy / 1e12}
        print(f"ceilings: bf16 matmul {matmul / 1e12:.0f} TFLOP/s, copy {copy / 1e12:.2f} TB/s", flush=True)
        # NOTE: the JSON is rewritten after each phase: a run cut short still returns its numbers.
        payload["prefill"] = bench_prefill(device, args.smoke, matmul)
        write_result(payload, kind, args.results_dir)
        payload["decode"] = bench_decode(device, args.smoke, copy)
        write_result(payload, kind, args.results_dir)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.phase in ("engine", "all"):
        payload["engine"] = bench_engine(args.smoke)
    print("wrote", write_result(payload, kind, args.results_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
