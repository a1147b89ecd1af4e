"""Long-context benchmark (issue 13), one GPU call (bench/longctx_gpu.sh runs it): prefill attention
at 8k/16k/32k context against the bf16 matmul rate, then our daemon and vLLM's server on the
Llama-3.1-8B shape with the same client. One JSON (to $OUT when set), rewritten after every step:

    python -m appliance_bench.longctx                       # kernels + engine, ~5 min on an H200
    python -m appliance_bench.longctx --phase kernels       # the kernel phase only (~1.5 min)
    python -m appliance_bench.longctx --phase compile       # CPU: the sweep's tiles compiled for sm_90a
    TRITON_INTERPRET=1 python -m appliance_bench.longctx --smoke --servers on    # CPU, tiny (CI)

Kernel phase. Each prefill case is `num_seqs` sequences, each a chunk of `q` new tokens after `ctx`
cached ones (the 8B's 32/8/128 heads, 16-token pages scattered at random): the mixed-batch kernel
(kernels/attention.py, the production path), the prefill kernel (kernels/prefill_attention.py)
with every tile of SWEEP_TILES, the first tile again on 64-token pages with and without TMA boxes,
and torch's SDPA over the same K/V gathered into contiguous tensors (FlashAttention-2 for fresh
prompts; the memory-efficient kernel with a lower-right causal mask after a context), for scale.
Every output is checked against SDPA's (relative error <= 2e-2; a wrong kernel is not timed).
Timing: CUDA events around each launch, one warm-up, then as many launches as fit in ~0.25 s
(3..20), median. TFLOP/s count the causal FLOPs (4 * Hq * D * (q * ctx + q (q + 1) / 2) per
sequence) and are divided by a bf16 8192^3 matmul measured in the same run, before and after.
Then shorter chunks (16 x 512 fresh, 512 after 16k, 2k after 30k) with the best gather tile, which
set the switch: the smallest chunk length from which on the prefill kernel wins at every measured
case. Then split-KV decode at 32k-128k against the copy rate.

Engine phase (bench/longctx_serve.py): vLLM's server, our daemon with the prefill kernel on (the
kernel phase's best tile and switch, through $APPLIANCE_PREFILL_TILE and
$APPLIANCE_LONG_PREFILL_MIN_QUERY_TOKENS, read at import by the daemon's engine) and, if time is
left, with it off. Ours serves at --max-model-len 131072 (issue 13 item 5: the 8B's whole context
on one H200); vLLM at 32832 (32k + 64), as the peer README runs it. vLLM's server starts first, in
the background, while the kernel phase runs (it is ~90 s of imports and compilation, mostly CPU; its
profile run and graph capture are short bursts on the GPU, so the kernel medians stand, and the
matmul rate is measured before and after to show it): that is what fits all three servers in one
6-minute call. `--no-overlap` starts it after the kernel phase instead. Every step checks the time
left (`--budget-s` from $LONGCTX_T0, the wrapper's start) and is skipped, with the reason in the
JSON, when it would not finish.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from appliance_bench import longctx_serve as serve

HEADS = (32, 8, 128)  # Llama-3.1-8B: query heads, kv heads, head size
BLOCK_SIZE = 16
# (sequences, new tokens each, cached tokens before them): 8k chunks (the engine's step budget) at
# 8k, 16k and 32k of context, then the shorter chunks that place the switch.
PREFILL_CASES = [(1, 8192, 0), (1, 8192, 8192), (1, 8192, 24576)]
THRESHOLD_CASES = [(16, 512, 0), (1, 512, 16384), (1, 2048, 30720)]
DECODE_CASES = [(1, 32768, None), (1, 131072, None), (1, 8192, None), (2, 32768, None), (8, 32768, None),
                (64, 16384, None), (1, 32768, 4096)]
# Decode tiles tried on the long-row launches (keys per iteration, warps, pipeline stages).
DECODE_TILE_SWEEP = [{"block_n": n, "num_warps": w, "num_stages": st}
                     for n in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]
SMOKE_PREFILL = [(1, 24, 0), (2, 13, 70)]
SMOKE_THRESHOLD = [(2, 8, 0), (1, 16, 40)]
SMOKE_DECODE = [(1, 90, None), (2, 60, 16)]
SMOKE_TILE = {"rows": 16, "block_n": 16, "num_warps": 4, "num_stages": 2}
MAX_REL_ERR = 2e-2
FALLBACK_THRESHOLD = 1024  # the switch for the "on" daemon when the kernel phase did not run
OURS_NEEDS_S, VLLM_NEEDS_S = 80.0, 150.0  # start + workloads + stop, to decide what still fits
OURS_MAX_START_S, VLLM_MAX_START_S = 120.0, 200.0  # not healthy by then: recorded as failed, next server


class Clock:
    """Seconds left of the call's budget, counted from $LONGCTX_T0 (epoch seconds) or now."""

    def __init__(self, budget_s: float) -> None:
        self.t0 = float(os.environ.get("LONGCTX_T0") or time.time())
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def deadline(self) -> float:
        """The end of the budget on time.monotonic()'s scale."""
        return time.monotonic() + self.left()


# ----------------------------------------------------------------------------------------- kernels


def _batch(num_seqs: int, q_len: int, ctx: int, device: torch.device, heads: tuple[int, int, int],
           dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, ...]:
    """q, k_cache, v_cache, block_tables, seq_lens, query_start_loc of `num_seqs` equal sequences,
    their pages scattered at random over the cache."""
    hq, hkv, d = heads
    seq_len = ctx + q_len
    per_seq = -(-seq_len // block_size)
    num_blocks = num_seqs * per_seq + 4
    gen = torch.Generator(device=device).manual_seed(seq_len * 31 + num_seqs)
    # Drawn in their dtype: no fp32 temporaries (B=64 x 16k of K/V is 4.3 GB of bf16, beside vLLM's start).
    k = torch.randn((num_blocks, block_size, hkv, d), generator=gen, device=device, dtype=dtype).mul_(0.5)
    v = torch.randn((num_blocks, block_size, hkv, d), generator=gen, device=device, dtype=dtype).mul_(0.5)
    q = torch.randn((num_seqs * q_len, hq, d), generator=gen, device=device, dtype=dtype)
    tables = torch.randperm(num_blocks, generator=gen, device=device)[: num_seqs * per_seq].view(num_seqs, per_seq)
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device)
    qsl = torch.arange(0, num_seqs * q_len + 1, q_len, dtype=torch.int32, device=device)
    return q, k, v, tables.to(torch.int32).contiguous(), seq_lens, qsl


def _contiguous_kv(cache: torch.Tensor, tables: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, S, Hkv, D]: each sequence's first seq_len cached rows, in order."""
    blocks = -(-seq_len // cache.shape[1])
    rows = cache[tables[:, :blocks].long()]  # [B, blocks, BS, Hkv, D]
    return rows.reshape(tables.shape[0], -1, *cache.shape[2:])[:, :seq_len]


def _repage(args: tuple[torch.Tensor, ...], block_size: int) -> tuple[torch.Tensor, ...]:
    """The same batch over pages of `block_size` tokens, in order (TMA tiles need whole key tiles
    per page)."""
    q, k, v, tables, seq_lens, qsl = args
    num_seqs, seq_len = tables.shape[0], int(seq_lens[0])
    pages = -(-seq_len // block_size)
    new = []
    for cache in (k, v):
        rows = _contiguous_kv(cache, tables, seq_len)  # [B, S, Hkv, D]
        paged = torch.zeros((num_seqs * pages + 1, block_size, *cache.shape[2:]), dtype=cache.dtype,
                            device=cache.device)
        flat = paged[: num_seqs * pages].view(num_seqs, pages * block_size, *cache.shape[2:])
        flat[:, :seq_len] = rows
        new.append(paged)
    new_tables = torch.arange(num_seqs * pages, dtype=torch.int32, device=q.device).view(num_seqs, pages)
    return q, new[0], new[1], new_tables, seq_lens, qsl


def _sdpa_run(args: tuple[torch.Tensor, ...], scale: float, q_len: int, ctx: int,
              heads: tuple[int, int, int]) -> tuple[str, Any]:
    """torch SDPA over the batch's K/V gathered into contiguous [B, Hq, S, D] tensors: its label
    and a function returning [T, Hq, D] like the paged kernels."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    q, k_cache, v_cache, tables, _, _ = args
    hq, hkv, d = heads
    num_seqs, seq_len = tables.shape[0], ctx + q_len
    k, v = (_contiguous_kv(c, tables, seq_len).transpose(1, 2).repeat_interleave(hq // hkv, dim=1).contiguous()
            for c in (k_cache, v_cache))
    qb = q.view(num_seqs, q_len, hq, d).transpose(1, 2)
    mask = None if ctx == 0 else causal_lower_right(q_len, seq_len)

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] if q.is_cuda else [SDPBackend.MATH]

    def run() -> torch.Tensor:
        with sdpa_kernel(backends):
            if mask is None:
                out = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale)
            else:
                out = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(num_seqs * q_len, hq, d)

    label = "torch SDPA (flash, causal)" if mask is None else "torch SDPA (mem-efficient, lower-right causal)"
    return label, run


def _time_ms(fn: Any, device: torch.device, budget_s: float = 0.25) -> float:
    """Median milliseconds of fn(): events around each launch on GPU (after a warm-up and a
    one-launch estimate, as many launches as fit in budget_s, 3..20); one timed call on CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(21)]
    events[0][0].record()
    fn()
    events[0][1].record()
    events[0][1].synchronize()
    reps = max(3, min(20, int(budget_s * 1e3 / max(events[0][0].elapsed_time(events[0][1]), 1e-3))))
    for start, end in events[1 : reps + 1]:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events[1 : reps + 1])


def _time_graph_us(fn: Any, device: torch.device, launches: int = 10) -> float:
    """Median microseconds per launch of a CUDA graph of `launches` launches (decode: launch
    overhead would hide the kernel), 15 replays."""
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


def causal_flops(num_seqs: int, q_len: int, ctx: int, heads: tuple[int, int, int]) -> float:
    """QK^T and PV over the keys each query sees: ctx + i + 1 for the i-th new token."""
    return 4.0 * heads[0] * heads[2] * num_seqs * (q_len * ctx + q_len * (q_len + 1) / 2)


def _prefill_case(num_seqs: int, q_len: int, ctx: int, device: torch.device, heads: tuple[int, int, int],
                  dtype: torch.dtype, tiles: list[dict[str, int]], matmul_flops_per_s: float, *,
                  tma_tile: dict[str, int] | None, sdpa: bool) -> list[dict[str, Any]]:
    from appliance_kernels import attention, reference

    args = _batch(num_seqs, q_len, ctx, device, heads, dtype)
    scale = heads[2] ** -0.5
    flops = causal_flops(num_seqs, q_len, ctx, heads)
    common = {"max_query_len": q_len}
    # (kernel, tile, block size, run)
    runs: list[tuple[str, dict[str, int] | None, int, Any]] = [
        ("mixed-batch kernel", dict(attention.PREFILL_TILE), BLOCK_SIZE,
         functools.partial(attention.paged_attention_with_splits, *args, scale, num_splits=1, **common))]
    runs += [("prefill kernel", tile, BLOCK_SIZE, functools.partial(attention.paged_prefill_attention, *args, scale,
                                                                     tile=tile, **common)) for tile in tiles]
    if tma_tile is not None:
        # 64-token pages (`engine.block_size = 64`): the gather path and TMA boxes.
        page = 64 if device.type == "cuda" else 16
        paged = _repage(args, page)
        for use_tma in (0, 1):
            tile = {**tma_tile, "tma": use_tma}
            runs.append(("prefill kernel", tile, page, functools.partial(
                attention.paged_prefill_attention, *paged, scale, tile=tile, **common)))
    rows = []
    if not sdpa:
        want, checked_against = reference.paged_attention_ref(*args, scale).float(), "torch reference (fp32)"
    else:
        try:
            label, run = _sdpa_run(args, scale, q_len, ctx, heads)
            want, checked_against = run().float(), label
            runs.append((label, None, 0, run))
        except Exception as exc:  # SDPA refused the shape: the mixed-batch kernel (tested on GPUs) checks the rest
            rows.append({"phase": "prefill", "num_seqs": num_seqs, "q_len": q_len, "ctx": ctx, "kernel": "torch SDPA",
                         "tile": None, "block_size": 0, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            want, checked_against = runs[0][3]().float(), "mixed-batch kernel"
    mixed_out = None  # the production kernel's output: every other output is compared with it too
    for kernel, tile, page, fn in runs:
        row: dict[str, Any] = {"phase": "prefill", "num_seqs": num_seqs, "q_len": q_len, "ctx": ctx,
                               "kernel": kernel, "tile": tile, "block_size": page}
        try:
            got = fn()
            err = _rel_err(got, want)
            row["rel_err"] = err
            if kernel == "mixed-batch kernel":
                mixed_out = got.float()
            elif mixed_out is not None:
                row["rel_err_vs_mixed"] = _rel_err(got, mixed_out)
            del got
            if not err <= MAX_REL_ERR:
                row["error"] = f"relative error {err:.2e} > {MAX_REL_ERR} against {checked_against}: not timed"
            else:
                ms = _time_ms(fn, device)
                row.update(ms=ms, tflop_s=flops / ms / 1e9, of_matmul=flops / ms / 1e9 / (matmul_flops_per_s / 1e12),
                           checked_against=checked_against)
        except Exception as exc:  # a tile past the GPU's shared memory or registers: record, go on
            if device.type != "cuda":
                raise
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        what = (f"{row['ms']:9.3f} ms {row['tflop_s']:6.1f} TFLOP/s ({row['of_matmul']:.0%} of matmul) "
                f"err {row['rel_err']:.1e}") if "ms" in row else f"FAILED: {row['error'][:200]}"
        print(f"prefill {num_seqs:2d} x q={q_len:5d} ctx={ctx:6d} {kernel[:26]:26s} {_tile_str(tile, page)}: {what}",
              flush=True)
    del args, want, mixed_out
    return rows


def _tile_str(tile: dict[str, int] | None, page: int) -> str:
    if tile is None:
        return "-" * 24
    s = f"{tile['rows']}x{tile['block_n']} w{tile['num_warps']} s{tile['num_stages']}"
    return s + (f" tma{tile['tma']}" if "tma" in tile else "") + f" bs{page}"


def choose(rows: list[dict[str, Any]], cases: list[tuple[int, int, int]],
           threshold_cases: list[tuple[int, int, int]]) -> dict[str, Any]:
    """The best gather tile over `cases` (least total time, checked everywhere) and the switch:
    the smallest measured chunk length from which on that tile beats the mixed-batch kernel in
    every measured case (None: it never does, or nothing was measured)."""
    def ms(kernel: str, case: tuple[int, int, int], tile: dict[str, int] | None = None) -> float | None:
        for r in rows:
            if ((r["num_seqs"], r["q_len"], r["ctx"]) == case and r["kernel"] == kernel and r["block_size"] == BLOCK_SIZE
                    and (tile is None or r["tile"] == tile) and "ms" in r):
                return r["ms"]
        return None

    tiles = [r["tile"] for r in rows if r["kernel"] == "prefill kernel" and r["block_size"] == BLOCK_SIZE
             and "tma" not in r["tile"] and (r["num_seqs"], r["q_len"], r["ctx"]) == cases[0]]
    totals = {}
    for tile in tiles:
        times = [ms("prefill kernel", c, tile) for c in cases]
        if all(t is not None for t in times):
            totals[json.dumps(tile, sort_keys=True)] = sum(times)  # type: ignore[arg-type]
    if not totals:
        return {"tile": None, "threshold": None, "reason": "no prefill tile ran correctly in every case"}
    best = json.loads(min(totals, key=totals.__getitem__))
    speedups: dict[str, float | None] = {}
    for case in cases + threshold_cases:
        old, new = ms("mixed-batch kernel", case), ms("prefill kernel", case, best)
        speedups[f"{case[0]}x{case[1]}@{case[2]}"] = None if old is None or new is None else old / new
    by_q: dict[int, list[float | None]] = {}
    for case in cases + threshold_cases:
        by_q.setdefault(case[1], []).append(speedups[f"{case[0]}x{case[1]}@{case[2]}"])
    threshold = None
    for q in sorted(by_q, reverse=True):  # longest first: stop at the first length where it loses
        if all(s is not None and s > 1.0 for s in by_q[q]):
            threshold = q
        else:
            break
    reason = ("the prefill kernel wins from this chunk length on in every measured case" if threshold
              else "the prefill kernel does not beat the mixed-batch kernel at the longest chunks")
    return {"tile": best, "threshold": threshold, "speedup_over_mixed": speedups, "reason": reason}


def bench_prefill(device: torch.device, smoke: bool, matmul: float, clock: Clock, until_s: float,
                  rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The prefill cases into `rows`; returns the decision (`choose`)."""
    from appliance_kernels import attention, prefill_attention

    heads = (4, 2, 32) if smoke else HEADS
    dtype = torch.float32 if smoke else torch.bfloat16
    tiles = [SMOKE_TILE] if smoke else prefill_attention.SWEEP_TILES
    cases, threshold_cases = (SMOKE_PREFILL, SMOKE_THRESHOLD) if smoke else (PREFILL_CASES, THRESHOLD_CASES)
    saved = attention.LONG_PREFILL_MIN_QUERY_TOKENS
    attention.LONG_PREFILL_MIN_QUERY_TOKENS = None  # the mixed-batch kernel is the mixed-batch kernel
    try:
        for i, (n, q, ctx) in enumerate(cases):
            rows += _prefill_case(n, q, ctx, device, heads, dtype, tiles, matmul, tma_tile=tiles[0] if i == 0 else None,
                                  sdpa=not smoke)
        decision = choose(rows, cases, [])
        measured: list[tuple[int, int, int]] = []
        for n, q, ctx in threshold_cases:
            if decision["tile"] is None or clock.elapsed() > until_s:
                print(f"prefill {n} x q={q} ctx={ctx}: skipped (out of the kernel phase's time)", flush=True)
                continue
            rows += _prefill_case(n, q, ctx, device, heads, dtype, [decision["tile"]], matmul, tma_tile=None,
                                  sdpa=not smoke)
            measured.append((n, q, ctx))
        decision = choose(rows, cases, measured)
    finally:
        attention.LONG_PREFILL_MIN_QUERY_TOKENS = saved
    print(f"prefill decision: tile {decision['tile']}, switch at {decision['threshold']} tokens "
          f"({decision['reason']})", flush=True)
    return decision


def decode_ref(args: tuple[torch.Tensor, ...], scale: float, window: int | None) -> torch.Tensor:
    """fp32 attention of each sequence's one new token over its last `window` keys (all keys when
    None), the GQA group as a batch: reference.paged_attention_ref's math without its expanded K/V
    (4 GB of fp32 at 128k keys, which would crowd vLLM's start-up beside this phase)."""
    q, k_cache, v_cache, tables, seq_lens, _ = args
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b, seq_len in enumerate(seq_lens.tolist()):
        first = 0 if window is None else max(0, seq_len - window)
        k, v = (_contiguous_kv(c, tables[b : b + 1], seq_len)[0, first:].float() for c in (k_cache, v_cache))
        qg = q[b].float().view(hkv, -1, d)  # [Hkv, G, D]
        p = torch.softmax(torch.einsum("hgd,shd->hgs", qg, k) * scale, dim=-1)
        out[b] = torch.einsum("hgs,shd->hgd", p, v).reshape(-1, d)
    return out


def _decode_case(num_seqs: int, ctx: int, window: int | None, device: torch.device, heads: tuple[int, int, int],
                 dtype: torch.dtype, copy_bytes_per_s: float, sweep: tuple[int, ...]) -> dict[str, Any]:
    from appliance_kernels import attention

    args = _batch(num_seqs, 1, ctx - 1, device, heads, dtype)
    scale = heads[2] ** -0.5
    run = functools.partial(attention.paged_attention, *args, scale, max_query_len=1, max_seq_len=ctx,
                            is_decode_only=True, sliding_window=window)
    want = decode_ref(args, scale, window)
    err = _rel_err(run(), want)
    us = _time_graph_us(run, device)
    keys = min(ctx, window or ctx)
    kv_bytes = num_seqs * keys * heads[1] * heads[2] * 2 * args[1].element_size()
    splits = attention.choose_num_splits(num_seqs, heads[1], keys, device)
    row = {"phase": "decode", "num_seqs": num_seqs, "ctx": ctx, "sliding_window": window, "num_splits": splits,
           "us": us, "tb_s": kv_bytes / us / 1e6, "of_copy": kv_bytes / (us / 1e6) / copy_bytes_per_s,
           "rel_err": err, "splits_sweep": {}}
    print(f"decode B={num_seqs:3d} ctx={ctx:6d} window={window} splits={splits}: {us:9.1f} us "
          f"{row['tb_s']:5.2f} TB/s ({row['of_copy']:.0%} of copy) err {err:.1e}", flush=True)
    if splits > attention._MAX_SPLITS and not attention.is_fp8(args[1]) and device.type == "cuda":
        # Would another decode tile read a long row faster? (DECODE_TILE swapped for this launch,
        # as bench/tile_sweep.py does for the short ones.)
        row["tile_sweep"] = {}
        default = attention.DECODE_TILE
        try:
            for tile in DECODE_TILE_SWEEP:
                attention.DECODE_TILE = tile
                err_t = _rel_err(run(), want)
                us_t = _time_graph_us(run, device)
                key = f"{tile['block_n']}/{tile['num_warps']}/{tile['num_stages']}"
                row["tile_sweep"][key] = {"us": us_t, "tb_s": kv_bytes / us_t / 1e6, "rel_err": err_t}
                print(f"    tile {key:>9} (keys/warps/stages): {us_t:9.1f} us {kv_bytes / us_t / 1e6:5.2f} TB/s "
                      f"err {err_t:.1e}", flush=True)
        finally:
            attention.DECODE_TILE = default
    for num_splits in (n for n in sweep if n != splits):  # would another partition count read faster?
        run_n = functools.partial(attention.paged_attention_with_splits, *args, scale, max_query_len=1,
                                  num_splits=num_splits, sliding_window=window)
        err_n = _rel_err(run_n(), want)
        us_n = _time_graph_us(run_n, device)
        row["splits_sweep"][num_splits] = {"us": us_n, "tb_s": kv_bytes / us_n / 1e6, "rel_err": err_n}
        print(f"    num_splits={num_splits:3d}: {us_n:9.1f} us {kv_bytes / us_n / 1e6:5.2f} TB/s err {err_n:.1e}",
              flush=True)
    return row


def bench_decode(device: torch.device, smoke: bool, copy_bytes_per_s: float, clock: Clock, until_s: float,
                 rows: list[dict[str, Any]]) -> None:
    heads = (4, 2, 32) if smoke else HEADS
    dtype = torch.float32 if smoke else torch.bfloat16
    for num_seqs, ctx, window in SMOKE_DECODE if smoke else DECODE_CASES:
        if clock.elapsed() > until_s:
            print(f"decode B={num_seqs} ctx={ctx}: skipped (out of the kernel phase's time)", flush=True)
            continue
        # The cap's neighbours: 16 (the cap under LONG_ROW_KEYS keys), 32, and 128 past the default 64.
        sweep = (16, 32, 64, 128) if num_seqs == 1 and window is None and device.type == "cuda" else ()
        try:
            rows.append(_decode_case(num_seqs, ctx, window, device, heads, dtype, copy_bytes_per_s, sweep))
        except Exception as exc:
            if device.type != "cuda":
                raise
            rows.append({"phase": "decode", "num_seqs": num_seqs, "ctx": ctx, "sliding_window": window,
                         "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            print(f"decode B={num_seqs} ctx={ctx}: FAILED {rows[-1]['error'][:200]}", flush=True)


def kernel_phase(device: torch.device, smoke: bool, clock: Clock, until_s: float, out: dict[str, Any],
                 decode_only: bool = False) -> None:
    """Fills `out` as it goes (what was measured survives a failure later in the phase)."""
    from appliance_bench.roofline import measure_copy_bytes_per_s, measure_matmul_flops_per_s

    matmul = 1e12 if smoke else measure_matmul_flops_per_s(device)
    copy = 1e9 if smoke else measure_copy_bytes_per_s(device)
    out["ceilings"] = {"matmul_tflop_s": matmul / 1e12, "copy_tb_s": copy / 1e12}
    print(f"ceilings: bf16 matmul {matmul / 1e12:.0f} TFLOP/s, copy {copy / 1e12:.2f} TB/s", flush=True)
    out["prefill"], out["decode"] = [], []
    if not decode_only:
        out["decision"] = bench_prefill(device, smoke, matmul, clock, until_s, out["prefill"])
        out["summary"] = kernel_summary(out)
    bench_decode(device, smoke, copy, clock, until_s, out["decode"])
    if not smoke:
        after = measure_matmul_flops_per_s(device)
        out["ceilings"]["matmul_tflop_s_after"] = after / 1e12
        print(f"bf16 matmul after the kernel phase: {after / 1e12:.0f} TFLOP/s", flush=True)
        torch.cuda.empty_cache()


def kernel_summary(k: dict[str, Any]) -> dict[str, Any]:
    """Per 8k-chunk case: the mixed-batch kernel, the best prefill tile and SDPA, as TFLOP/s and
    fractions of the matmul rate."""
    best = k["decision"].get("tile")
    summary = {}
    for r in k["prefill"]:
        if "ms" not in r:
            continue
        key = f"{r['num_seqs']}x{r['q_len']}@{r['ctx']}"
        label = ("mixed" if r["kernel"] == "mixed-batch kernel" else "sdpa" if r["kernel"].startswith("torch")
                 else "prefill_best" if r["tile"] == best and r["block_size"] == BLOCK_SIZE else None)
        if label is not None:
            summary.setdefault(key, {})[label] = {"tflop_s": r["tflop_s"], "of_matmul": r["of_matmul"], "ms": r["ms"]}
    for case in summary.values():
        if "mixed" in case and "prefill_best" in case:
            case["prefill_over_mixed"] = case["mixed"]["ms"] / case["prefill_best"]["ms"]
        if "sdpa" in case and "prefill_best" in case:
            case["prefill_over_sdpa"] = case["sdpa"]["ms"] / case["prefill_best"]["ms"]
        if "prefill_best" in case:
            case["target_half_of_matmul"] = case["prefill_best"]["of_matmul"] >= 0.5
    return summary


# ------------------------------------------------------------------------------- offline compile


def compile_check(tiles: list[dict[str, int]], arch: int = 90) -> list[dict[str, Any]]:
    """Compile the prefill kernel for sm_{arch}a with each tile (the 8B's heads, bf16, 16-token pages;
    "tma" tiles on 64-token pages), without a GPU: registers and spills from ptxas -v, shared memory
    from Triton, and whether the K/V loads became cp.async / TMA copies and the dots wgmma."""
    import re

    import triton
    from appliance_kernels import prefill_attention as pa
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = pa._prefill_attention_kernel
    if not hasattr(fn, "arg_names"):
        raise RuntimeError("--phase compile needs TRITON_INTERPRET unset (the interpreter replaces the kernel)")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    hq, hkv, d = HEADS
    group = hq // hkv
    rows = []
    for tile in tiles:
        page = 64 if tile.get("tma") else BLOCK_SIZE
        block_q = max(1, tile["rows"] // group)
        consts = {"NUM_KV_HEADS": hkv, "HEAD_DIM": d, "BLOCK_D": d, "GROUP": group, "GROUP_PAD": group,
                  "BLOCK_Q": block_q, "BLOCK_M": max(16, block_q * group), "BLOCK_N": tile["block_n"],
                  "PAGE_SIZE": page, "IEEE_FP32": False, "IS_FP8": False, "SLIDING": False,
                  "USE_TMA": bool(tile.get("tma")), "EVEN_D": True}
        pointers = {"out_ptr": "*bf16", "q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
                    "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32"}
        floats = {"scale_log2", "v_scale"}
        signature = {name: "constexpr" if name in consts else pointers.get(name, "fp32" if name in floats else "i32")
                     for name in fn.arg_names}
        # As a launch specializes them: 16-byte aligned pointers, q/out strides multiples of 16.
        aligned = set(pointers) | {"stride_q_t", "stride_q_h", "stride_o_t", "stride_o_h"}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in aligned}
        row: dict[str, Any] = {"tile": tile, "block_size": page, "arch": f"sm_{arch}a"}
        t0 = time.perf_counter()
        try:
            kernel = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": tile["num_warps"], "num_stages": tile["num_stages"]})
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            rows.append(row)
            print(f"compile {_tile_str(tile, page)}: FAILED {row['error'][:200]}", flush=True)
            continue
        ptx = kernel.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        info = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                              capture_output=True, text=True).stderr
        os.unlink(f.name)
        regs = re.search(r"Used (\d+) registers", info)
        spills = re.search(r"(\d+) bytes spill stores", info)
        ttgir = kernel.asm["ttgir"]
        # Software pipelining: shared-memory buffers per K/V tile, and (gather path) how many key
        # tiles' copies (a K and a V each) a key loop leaves in flight when it waits for its own.
        buffers = [int(n) for n in re.findall(rf"memdesc<(\d+)x{tile['block_n']}x{d}xbf16", ttgir)]
        waits = [int(n) for n in re.findall(r"ttg\.async_wait [^\n]*\{num = (\d+)", ttgir)]
        row.update(compile_s=round(time.perf_counter() - t0, 1), shared_bytes=kernel.metadata.shared,
                   registers=int(regs.group(1)) if regs else None, spill_bytes=int(spills.group(1)) if spills else None,
                   wgmma=ptx.count("wgmma.mma_async"), cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                   tma_loads=ptx.count("cp.async.bulk.tensor"), kv_buffers=max(buffers, default=0),
                   tiles_in_flight=max(waits, default=0) // 2)
        rows.append(row)
        print(f"compile {_tile_str(tile, page)}: {row['registers']} registers, {row['spill_bytes']} B spilled, "
              f"{row['shared_bytes'] // 1024} KiB shared, wgmma {row['wgmma']}, cp.async {row['cp_async']}, "
              f"TMA {row['tma_loads']}, {row['kv_buffers']} K/V buffers, {row['tiles_in_flight']} tiles in flight",
              flush=True)
    return rows


# --------------------------------------------------------------------------------------- engine


def _ours(args: argparse.Namespace, port: int, switch: str, tile: dict[str, int] | None) -> serve.Server:
    # Its own control socket: the default one may belong to another daemon on this machine.
    cmd = [sys.executable, "-m", "appliance.cli", "serve", "--port", str(port), "--served-model-name", "m",
           "--control-socket", str(args.workdir / f"control-{switch}.sock")]
    if args.smoke:  # the default model (SmolLM2-135M, real weights) on CPU
        cmd += ["--max-model-len", "512", "--set", "engine.cpu_kv_cache_bytes=67108864"]
    else:
        cmd += ["--model", args.model, "--set", "model.load_format=dummy", "--set", f"model.tokenizer={args.tokenizer}",
                "--max-model-len", str(args.max_model_len)]
    env = {"APPLIANCE_LONG_PREFILL_MIN_QUERY_TOKENS": switch, "PYTHONUNBUFFERED": "1"}
    if tile is not None:
        env["APPLIANCE_PREFILL_TILE"] = json.dumps(tile)
    return serve.Server(f"ours ({'prefill kernel off' if switch == 'off' else 'prefill kernel on'})", cmd, port, env)


def _vllm(args: argparse.Namespace, workdir: Path) -> serve.Server:
    """vLLM's server from the peer setup (../shared/peer/README.md), with a clean PYTHONPATH and
    run outside the repository (its top-level kernels/ would shadow Hugging Face's `kernels`).
    --peer-cmd: that command instead ("peer" in the JSON), e.g. another build of ours."""
    if args.peer_cmd:
        return serve.Server("peer", shlex.split(args.peer_cmd), args.vllm_port, {"PYTHONUNBUFFERED": "1"})
    model_dir = workdir / "vllm-model"
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.vllm_config, model_dir / "config.json")
    inner = (f". {shlex.quote(str(Path(args.vllm_setup).resolve()))} && exec python3 -m vllm.entrypoints.cli.main "
             f"serve {shlex.quote(str(model_dir))} --load-format dummy --tokenizer "
             f"{shlex.quote(str(Path(args.tokenizer).resolve()))} --dtype bfloat16 --max-model-len "
             f"{args.vllm_max_model_len} --gpu-memory-utilization 0.9 --port {args.vllm_port} --served-model-name m")
    return serve.Server("vllm", ["bash", "-c", inner], args.vllm_port, {"PYTHONPATH": "", "PYTHONUNBUFFERED": "1"},
                        cwd=workdir)


def engine_switch(decision: dict[str, Any] | None,
                  fallback: int) -> tuple[dict[str, int] | None, int | None, str]:
    """(tile, switch, why) for the "on" daemon. No kernel phase: the default tile at `fallback`.
    A prefill tile that ran correctly but lost somewhere at the longest chunks: on for the longest
    chunks anyway, so the call still measures the engine both ways. No correct tile: None (no run)."""
    if decision is None:
        return None, fallback, "--threshold (no kernel phase)"
    tile, threshold = decision.get("tile"), decision.get("threshold")
    if threshold is not None or tile is None:
        return tile, threshold, "kernel phase"
    return tile, max(q for _, q, _ in PREFILL_CASES), "kernel phase: it never always won; the longest chunks, to measure it"


def engine_phase(args: argparse.Namespace, clock: Clock, payload: dict[str, Any], save: Any,
                 vllm: serve.Server | None, prompts: serve.Prompts) -> None:
    """Each server of --servers in turn; results into payload["engine"] (saved after each)."""
    eng = payload.setdefault("engine", {"servers": {}, "skipped": {}})
    eng["sizes"] = dataclasses.asdict(serve.SMOKE_SIZES if args.smoke else serve.Sizes())
    eng["client"] = "appliance.benchserve (in this process): streamed /v1/completions, ignore_eos"
    eng["prompts_build_s"] = prompts.build_s
    # None: the kernel phase did not run or failed; --smoke: its CPU timings decide nothing (the CPU
    # daemon runs the torch references anyway), so the "on" daemon is started with --threshold.
    decision = None if args.smoke else payload.get("kernels", {}).get("decision")
    tile, threshold, source = engine_switch(decision, args.threshold)
    eng["prefill_switch"] = {"threshold": threshold, "tile": tile, "from": source}
    for i, label in enumerate(args.servers):
        server: serve.Server | None
        need, max_start_s = OURS_NEEDS_S, OURS_MAX_START_S
        # vLLM leaves room for the one of ours that follows it (the comparison needs both).
        reserve = OURS_NEEDS_S if label == "vllm" and set(args.servers[i + 1 :]) & {"on", "off"} else 0.0
        if label == "vllm":
            max_start_s = VLLM_MAX_START_S
            server, need = vllm, (60.0 if vllm is not None else VLLM_NEEDS_S)
            if server is None:
                server = _vllm(args, args.workdir)
        elif label == "on":
            if threshold is None:
                eng["skipped"]["ours (prefill kernel on)"] = f"no prefill tile ran correctly: {decision}"
                print("[ours (prefill kernel on)] skipped: no prefill tile ran correctly in the kernel phase",
                      flush=True)
                continue
            server = _ours(args, args.port, str(threshold), tile)
        else:
            server = _ours(args, args.port, "off", None)
        if clock.left() - reserve < need:
            eng["skipped"][server.label] = f"{clock.left():.0f} s left, needs ~{need:.0f} s"
            print(f"[{server.label}] skipped: {eng['skipped'][server.label]}", flush=True)
            if server.proc is not None:
                server.stop()
            continue
        if server.proc is None:
            _wait_gpu_free()
            server.start(args.logs_dir / f"serve_{label}.log")
        eng["servers"][server.label] = serve.measure_server(server, prompts, clock.deadline() - reserve,
                                                            max_start_s=max_start_s)
        save()
    peer = "peer" if args.peer_cmd else "vllm"
    vllm_result = eng["servers"].get(peer, {})
    eng["ratios_vs_vllm"] = {}
    eng["targets"] = {}
    for label, result in eng["servers"].items():
        if label != peer:
            r = serve.ratios(result, vllm_result)
            eng["ratios_vs_vllm"][label] = r
            eng["targets"][label] = serve.targets(r)


def _wait_gpu_free(timeout_s: float = 20.0) -> None:
    """Until the previous server's memory is back (its processes are gone; the driver can lag)."""
    if not torch.cuda.is_available():
        return
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            free, total = torch.cuda.mem_get_info()
        except RuntimeError:  # this process's context is broken (a kernel fault): the servers have their own
            return
        if free > 0.9 * total:
            return
        time.sleep(0.5)


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from appliance_bench.results import write_result

    parser = argparse.ArgumentParser(prog="python -m appliance_bench.longctx", description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["kernels", "decode", "engine", "all", "compile"], default="all",
                        help="decode: the decode cases of the kernel phase alone")
    parser.add_argument("--results-dir", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU: the kernel phase at tiny shapes under the Triton interpreter, our daemon on the "
                             "default model with tiny prompts")
    parser.add_argument("--budget-s", type=float, default=345.0, help="seconds for everything, from $LONGCTX_T0")
    parser.add_argument("--kernel-phase-s", type=float, default=110.0,
                        help="the switch and decode cases are skipped past this many seconds of the budget")
    parser.add_argument("--servers", default="vllm,on,off",
                        help="engine phase, in order: vllm, on (ours, prefill kernel on), off (ours, off)")
    parser.add_argument("--no-overlap", action="store_true", help="start vLLM after the kernel phase, not during")
    parser.add_argument("--threshold", type=int, default=FALLBACK_THRESHOLD,
                        help="the switch for 'on' when the kernel phase does not run")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--max-model-len", type=int, default=131072, help="our daemon's")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tokenizer", default=".peer/tok")
    parser.add_argument("--vllm-config", default=".peer/llama-3.1-8b-config.json")
    parser.add_argument("--vllm-setup", default=".peer/vllm-setup.sh")
    parser.add_argument("--vllm-max-model-len", type=int, default=32832)
    parser.add_argument("--vllm-port", type=int, default=8001)
    parser.add_argument("--peer-cmd", help="the server to compare against instead of vLLM's (one command line, "
                                           "serving model 'm' on --vllm-port)")
    parser.add_argument("--tiles", choices=["sweep", "default"], default="sweep", help="--phase compile: which tiles")
    args = parser.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if bad := set(args.servers) - {"vllm", "on", "off"}:
        parser.error(f"--servers: unknown {sorted(bad)} (vllm, on, off)")
    clock = Clock(args.budget_s)
    cuda = torch.cuda.is_available()
    kind = "longctx" + ("-smoke" if args.smoke else "") + ("" if args.phase == "all" else f"-{args.phase}")
    payload: dict[str, Any] = {"benchmark": "long context (issue 13)", "args": {k: str(v) for k, v in vars(args).items()}}

    def save() -> Path:
        return write_result(payload, kind, args.results_dir)

    if args.phase == "compile":
        return _compile_phase(args, payload, save)
    if args.smoke and not os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("--smoke needs TRITON_INTERPRET=1 set before the kernels are imported")
    if args.smoke and "vllm" in args.servers and not args.peer_cmd:
        parser.error("--smoke: vLLM needs the GPU; --servers on and/or off, or a --peer-cmd to stand in")
    args.logs_dir = args.results_dir or Path(tempfile.mkdtemp(prefix="longctx-logs-"))
    args.workdir = Path(tempfile.mkdtemp(prefix="longctx-work-"))
    device = torch.device("cuda" if cuda and not args.smoke else "cpu")
    run_kernels = args.phase in ("kernels", "decode", "all")
    run_engine = args.phase in ("engine", "all") and bool(args.servers)
    if not cuda and not args.smoke:
        reason = ("no CUDA device: the long-context benchmark measures an H100/H200 (on CPU, "
                  "`TRITON_INTERPRET=1 ... --smoke` checks this script at tiny size)")
        for phase, wanted in (("kernels", run_kernels), ("engine", run_engine)):
            if wanted:
                payload[phase] = {"skipped": reason}
                print(f"{phase} phase skipped: {reason}", flush=True)
        print("wrote", save())
        return 0

    vllm = None
    if run_engine and "vllm" in args.servers and run_kernels and not args.no_overlap:
        # Started now, ~90 s of start-up under the kernel phase; it runs first (the GPU's memory is its).
        args.servers = ["vllm", *(s for s in args.servers if s != "vllm")]
        vllm = _vllm(args, args.workdir)
        vllm.start(args.logs_dir / "serve_vllm.log")
        payload["vllm_started_during_kernel_phase"] = True
    try:
        # The prompts (1.4M tokens of exact-length text, ~10 s of tokenizer work) are built in a
        # process of their own while the kernel phase runs.
        builder = None
        if run_engine:
            tok = str(_default_tokenizer()) if args.smoke else args.tokenizer
            builder = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            pending = builder.submit(serve.build_prompts, tok, serve.SMOKE_SIZES if args.smoke else serve.Sizes())
        if run_kernels:
            payload["kernels"] = {}
            try:
                kernel_phase(device, args.smoke, clock, args.kernel_phase_s, payload["kernels"],
                             decode_only=args.phase == "decode")
            except Exception as exc:  # the engine phase still runs; the JSON says why
                if args.smoke:
                    raise
                payload["kernels"]["error"] = traceback.format_exc()[-4000:]
                print(f"kernel phase FAILED: {type(exc).__name__}: {exc}", flush=True)
            print("wrote", save(), flush=True)
        if builder is not None:
            try:
                prompts = pending.result()
            except Exception as exc:  # no prompts, no engine phase; the JSON says why
                payload["engine"] = {"error": f"building the prompts failed: {type(exc).__name__}: {exc}"}
                print(payload["engine"]["error"], flush=True)
            else:
                print(f"prompts built in {prompts.build_s:.1f} s (beside the kernel phase)", flush=True)
                engine_phase(args, clock, payload, save, vllm, prompts)
    finally:
        if builder is not None:
            builder.shutdown(cancel_futures=True)
        if vllm is not None and vllm.proc is not None:
            vllm.stop()
    payload["elapsed_s"] = clock.elapsed()
    print(json.dumps({"kernels": payload.get("kernels", {}).get("summary"),
                      "decision": payload.get("kernels", {}).get("decision"),
                      "engine_ratios_vs_vllm": payload.get("engine", {}).get("ratios_vs_vllm"),
                      "engine_targets": payload.get("engine", {}).get("targets"),
                      "skipped": payload.get("engine", {}).get("skipped")}, indent=1, default=str), flush=True)
    print("wrote", save())
    return 0


def _default_tokenizer() -> Path:
    from appliance.models.fetch import default_model_dir

    return default_model_dir()


def _compile_phase(args: argparse.Namespace, payload: dict[str, Any], save: Any) -> int:
    """--phase compile; in a child without TRITON_INTERPRET when it is set (the tests set it)."""
    if os.environ.get("TRITON_INTERPRET"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "appliance_bench.longctx", "--phase", "compile", "--tiles", args.tiles]
        if args.results_dir is not None:
            cmd += ["--results-dir", str(args.results_dir)]
        return subprocess.run(cmd, env=env).returncode
    from appliance_kernels import prefill_attention

    tiles = ([prefill_attention.DEFAULT_TILE] if args.tiles == "default" else
             [*prefill_attention.SWEEP_TILES, {**prefill_attention.SWEEP_TILES[0], "tma": 1}])
    payload["compile"] = compile_check(tiles)
    print("wrote", save())
    return 0 if all("error" not in r for r in payload["compile"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
