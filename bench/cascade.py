"""Decode attention of a batch sharing a prefix: plain paged decode against cascade attention.

The shape of vLLM's "shared prefix" serving workload on an 8B Llama (issue 9): 256 sequences, a
shared 2,048-token prefix, then each sequence's own 128..256 tokens; 32 query / 8 kv heads of 128,
bf16, 16-token blocks. Times one layer's attention (median of CUDA-event timings through
triton.testing.do_bench, which flushes L2 before each run), checks that both give the same output,
and reports the K/V bytes each must read at least. Cases: everyone shares; 4 rows hold private
copies of the prefix (the first prompts of a burst, prefilled before the prefix cache held it);
fewer rows (near the engine's threshold); a short prefix. `--sweep` also times the prefix tiles
of cascade_attention.PREFIX_TILES and prefix partition counts on the first case (time-boxed).
`--smoke` runs tiny shapes on CPU under the Triton interpreter (CI).

`--engine` then runs the workload itself through the engine, once with engine.cascade_attention
"off" and once "auto", each in a process of its own (a dummy Llama-3.1-8B, bf16, no tokenizer):
256 prompts at once of a shared 2,048-token prefix + 128 own tokens -> 128 output tokens. It
reports start-up time (the cascade graphs' capture included; their time and memory are also in
the engine's log), free GPU memory after start-up, steps that took the cascade path, the median
step time over the last 100 (decode) steps, output tok/s, and how many requests' greedy tokens
are the same in both runs (bf16: a few may differ by rounding).

    python -m appliance_bench.cascade [--smoke] [--sweep] [--engine] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Case:
    name: str
    num_seqs: int
    prefix: int  # shared tokens (whole blocks)
    suffix: tuple[int, int]  # each row's own tokens, uniform in [lo, hi]
    loners: int = 0  # rows that hold private copies (share 0)


@dataclass
class Timing:
    case: str
    num_seqs: int
    prefix: int
    mean_suffix: float
    plain_ms: float
    cascade_ms: float
    speedup: float
    plain_min_gb: float  # K/V bytes plain decode must read (the prefix once per row)
    cascade_min_gb: float  # the prefix once, the suffixes once
    max_rel_err: float  # cascade vs plain, per row
    prefix_splits: int


CASES = [
    Case("shared-2048 x256", 256, 2048, (128, 256)),
    Case("4 private copies", 256, 2048, (128, 256), loners=4),
    Case("shared-2048 x32", 32, 2048, (128, 256)),
    Case("shared-512 x256", 256, 512, (128, 256)),
]
SMOKE_CASES = [Case("smoke", 5, 32, (1, 9), loners=1)]
HEADS = (32, 8, 128)  # Llama-3.1-8B: query heads, kv heads, head dim
SMOKE_HEADS = (4, 2, 64)
BLOCK_SIZE = 16
MAX_MODEL_LEN = 8192  # the decode graphs' max_seq_len bound (the plain path's split choice)


class Batch:
    def __init__(self, case: Case, heads: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                 block_size: int) -> None:
        num_q, num_kv, dim = heads
        gen = torch.Generator().manual_seed(0)
        lo, hi = case.suffix
        own = torch.randint(lo, hi + 1, (case.num_seqs,), generator=gen).tolist()
        shared_blocks = case.prefix // block_size
        self.seq_lens = [case.prefix + n for n in own]
        tables, next_block = [], shared_blocks
        for b, n in enumerate(self.seq_lens):
            total = -(-n // block_size)
            first = 0 if b < case.loners else shared_blocks
            table = list(range(first)) + list(range(next_block, next_block + total - first))
            next_block += total - first
            tables.append(table)
        width = max(len(t) for t in tables)
        shape = (next_block, block_size, num_kv, dim)
        self.k = torch.randn(shape, generator=gen).to(dtype).to(device)
        self.v = torch.randn(shape, generator=gen).to(dtype).to(device)
        # Private copies hold the same K/V as the shared blocks (as a recomputed prefix does).
        for b in range(case.loners):
            mine = torch.tensor(tables[b][:shared_blocks], device=device)
            self.k[mine] = self.k[:shared_blocks].clone()
            self.v[mine] = self.v[:shared_blocks].clone()
        self.q = torch.randn((case.num_seqs, num_q, dim), generator=gen).to(dtype).to(device)
        self.tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
        self.lens = torch.tensor(self.seq_lens, dtype=torch.int32, device=device)
        self.qsl = torch.arange(case.num_seqs + 1, dtype=torch.int32, device=device)
        self.prefix_blocks = torch.arange(max(1, shared_blocks), dtype=torch.int32, device=device)
        self.prefix_len = torch.tensor([case.prefix], dtype=torch.int32, device=device)
        shares = [0 if b < case.loners else case.prefix for b in range(case.num_seqs)]
        self.shares = torch.tensor(shares, dtype=torch.int32, device=device)
        self.bytes_per_token = 2 * num_kv * dim * self.k.element_size()
        self.own = own


def _median_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.float() - ref.float()).flatten(1).norm(dim=1) / ref.float().flatten(1).norm(dim=1)
    return float(diff.max())


def run(cases: list[Case], heads: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
        sweep: bool = False, sweep_seconds: float = 35.0, block_size: int = BLOCK_SIZE,
        max_model_len: int = MAX_MODEL_LEN) -> tuple[list[Timing], list[dict[str, object]]]:
    from appliance_kernels import attention, cascade_attention

    scale = heads[2] ** -0.5
    timings: list[Timing] = []
    swept: list[dict[str, object]] = []
    for case in cases:
        b = Batch(case, heads, dtype, device, block_size)

        def plain(b: Batch = b) -> torch.Tensor:
            return attention.paged_attention(b.q, b.k, b.v, b.tables, b.lens, b.qsl, scale, max_query_len=1,
                                             max_seq_len=max_model_len, is_decode_only=True)

        def cascade(b: Batch = b, **kwargs: object) -> torch.Tensor:
            return cascade_attention.cascade_attention(b.q, b.k, b.v, b.tables, b.lens, b.prefix_blocks, b.prefix_len,
                                                       scale, row_prefix_lens=b.shares, **kwargs)

        ref = plain()
        err = _rel_err(cascade(), ref)
        splits = cascade_attention.choose_prefix_splits(case.num_seqs, heads[1], heads[0] // heads[1],
                                                        b.prefix_blocks.numel() * b.k.shape[1], device)
        plain_ms, cascade_ms = _median_ms(plain, device), _median_ms(cascade, device)
        suffix_tokens = sum(b.seq_lens) - (case.num_seqs - case.loners) * case.prefix
        timings.append(Timing(
            case.name, case.num_seqs, case.prefix, statistics.mean(b.own), plain_ms, cascade_ms, plain_ms / cascade_ms,
            sum(b.seq_lens) * b.bytes_per_token / 1e9, (case.prefix + suffix_tokens) * b.bytes_per_token / 1e9,
            err, splits))
        if sweep and case is cases[0]:
            t_end = time.monotonic() + sweep_seconds
            for tile in cascade_attention.PREFIX_TILES:
                for prefix_splits in (1, 2, 4, 8, 16):
                    if time.monotonic() > t_end:
                        break
                    out = cascade(prefix_tile=tile, prefix_splits=prefix_splits)
                    ms = _median_ms(lambda t=tile, s=prefix_splits: cascade(prefix_tile=t, prefix_splits=s), device)
                    swept.append({"tile": tile, "prefix_splits": prefix_splits, "ms": ms,
                                  "max_rel_err": _rel_err(out, ref)})
    return timings, swept


def format_table(timings: list[Timing]) -> str:
    lines = [f"{'case':<20} {'B':>4} {'prefix':>6} {'suffix':>6} {'plain ms':>9} {'cascade ms':>10} {'speedup':>7} "
             f"{'plain GB':>8} {'casc GB':>7} {'splits':>6} {'rel err':>8}"]
    for t in timings:
        lines.append(f"{t.case:<20} {t.num_seqs:>4} {t.prefix:>6} {t.mean_suffix:>6.0f} {t.plain_ms:>9.4f} "
                     f"{t.cascade_ms:>10.4f} {t.speedup:>7.2f} {t.plain_min_gb:>8.3f} {t.cascade_min_gb:>7.3f} "
                     f"{t.prefix_splits:>6} {t.max_rel_err:>8.1e}")
    return "\n".join(lines)


ENGINE_PROMPTS, ENGINE_PREFIX, ENGINE_OWN, ENGINE_OUTPUT = 256, 2048, 128, 128


def engine_run(mode: str, smoke: bool = False) -> dict[str, object]:
    """The shared-prefix workload through EngineCore with engine.cascade_attention = mode."""
    import random

    from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from appliance.engine.llm_engine import EngineCore
    from appliance.engine.sequence import SamplingParams

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    prompts, prefix, own, output = (12, 300, 8, 6) if smoke else (ENGINE_PROMPTS, ENGINE_PREFIX, ENGINE_OWN,
                                                                    ENGINE_OUTPUT)
    cuda = torch.cuda.is_available() and not smoke
    config = EngineConfig(
        model=ModelConfig(model="llama-3.1-8b" if cuda else "tiny-llama", load_format="dummy",
                          dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu", seed=1),
        cache=CacheConfig(cpu_kv_cache_bytes=64 << 20),
        scheduler=SchedulerConfig(max_model_len=1024 if smoke else 4096, max_num_seqs=256,
                                  max_num_batched_tokens=320 if smoke else 8192),
        cascade_attention=mode,
    )
    t0 = time.perf_counter()
    engine = EngineCore(config, stream_outputs=False)
    startup_s = time.perf_counter() - t0
    free_gib = torch.cuda.mem_get_info()[0] / 2**30 if cuda else None
    rng = random.Random(0)
    vocab = engine.vocab_size
    shared = [rng.randrange(vocab) for _ in range(prefix)]
    params = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
    for i in range(prompts):
        engine.add_request(f"r{i}", shared + [rng.randrange(vocab) for _ in range(own)], params)
    steps: list[float] = []
    tokens: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
        steps.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    runner = engine.runner
    return {"mode": mode, "startup_s": round(startup_s, 2), "free_gib_after_startup": free_gib,
            "decode_graphs": len(runner.graphs), "cascade_graphs": len(runner.cascade_graphs),
            "cascade_min_seqs": runner.cascade_min_seqs, "cascade_steps": runner.cascade_steps, "steps": len(steps),
            "median_step_ms_last_100": statistics.median(steps[-100:]) * 1e3, "wall_s": round(wall, 2),
            "output_tok_s": prompts * output / wall, "tokens": tokens}


def engine_compare(smoke: bool) -> dict[str, object]:
    """engine_run for "off" then "auto", each in a fresh process (all GPU memory back in between)."""
    runs = {}
    for mode in ("off", "auto"):
        cmd = [sys.executable, "-m", "appliance_bench.cascade", "--engine-mode", mode] + (["--smoke"] if smoke else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=400)
        sys.stderr.write(done.stderr[-3000:])
        if done.returncode != 0:
            raise RuntimeError(f"engine run {mode} failed ({done.returncode}): {done.stderr[-2000:]}")
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    off, auto = runs["off"].pop("tokens"), runs["auto"].pop("tokens")
    same = sum(off.get(r) == auto.get(r) for r in off)
    return {"off": runs["off"], "auto": runs["auto"], "same_greedy_tokens": f"{same}/{len(off)}",
            "step_speedup": runs["off"]["median_step_ms_last_100"] / runs["auto"]["median_step_ms_last_100"],
            "throughput_ratio": runs["auto"]["output_tok_s"] / runs["off"]["output_tok_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter), fp32")
    parser.add_argument("--sweep", action="store_true", help="also time prefix tiles and partition counts")
    parser.add_argument("--engine", action="store_true", help="also the workload through the engine, off vs auto")
    parser.add_argument("--engine-mode", choices=("off", "auto"), help=argparse.SUPPRESS)  # one engine run
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    from appliance_bench.results import result_header

    smoke = args.smoke or not torch.cuda.is_available()
    if args.engine_mode:
        print(json.dumps(engine_run(args.engine_mode, smoke)))
        return 0
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    t0 = time.monotonic()
    block_size = 4 if smoke else BLOCK_SIZE
    timings, swept = run(SMOKE_CASES if smoke else CASES, SMOKE_HEADS if smoke else HEADS, dtype, device,
                         sweep=args.sweep, sweep_seconds=2.0 if smoke else 35.0, block_size=block_size,
                         max_model_len=64 if smoke else MAX_MODEL_LEN)
    print(format_table(timings))
    for row in sorted(swept, key=lambda r: r["ms"]):
        print(f"sweep {row['tile']} splits={row['prefix_splits']}: {row['ms']:.4f} ms (rel err {row['max_rel_err']:.1e})")
    ok = all(t.max_rel_err <= (1e-4 if smoke else 2e-2) for t in timings)
    ok = ok and all(r["max_rel_err"] <= (1e-4 if smoke else 2e-2) for r in swept)
    payload = {**result_header(), "smoke": smoke, "dtype": str(dtype), "heads": HEADS if not smoke else SMOKE_HEADS,
               "block_size": block_size, "timings": [asdict(t) for t in timings], "sweep": swept, "outputs_match": ok,
               "seconds": round(time.monotonic() - t0, 1)}
    if args.engine:
        payload["engine"] = engine = engine_compare(smoke)
        print(json.dumps(engine))
        ok = ok and engine["auto"]["cascade_steps"] > 0
        payload["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(payload, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
