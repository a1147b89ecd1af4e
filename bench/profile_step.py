"""Where an engine step's time goes: host phases, time spent waiting for the device, GPU kernels.

Runs a W1-like workload (N requests x P random prompt tokens -> O tokens, EOS ignored, all at
once) on a `dummy` architecture and reports, per kind of step (prefill/mixed vs decode-only):
- wall time per step and the host time in each phase (schedule, launch, wait for the sampled
  ids, process, outputs): `wait` near 0 means the host, not the GPU, sets the pace;
- for a window of steady decode steps, a torch.profiler trace summed by kernel name (GPU time per
  step, and its share of the wall time: the GPU's busy fraction).

    python -m appliance_bench.profile_step --model llama-3.1-8b --num-requests 512 --max-num-seqs 512
    python -m appliance_bench.profile_step --model llama-3.1-8b --num-requests 1 --prompt-tokens 256

`--smoke` runs a tiny model on CPU (CI keeps the script working). JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

PHASES = ("schedule", "launch", "wait", "process", "outputs")


class _PhaseClock:
    """Wraps engine methods and sums the wall time spent in each, per step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = collections.defaultdict(float)

    def wrap(self, phase: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[phase] += time.perf_counter() - t0
        return timed

    def take(self) -> dict[str, float]:
        out, self.current = dict(self.current), collections.defaultdict(float)
        return out


def instrument(engine: Any) -> _PhaseClock:
    """Time this engine's phases (its own methods only: nothing global is patched). `wait` is the
    host blocked on a step's sampled ids."""
    clock = _PhaseClock()
    engine.scheduler.schedule = clock.wrap("schedule", engine.scheduler.schedule)
    # process: Scheduler.update_from_output (placeholders, hashes, forks, stop checks);
    # outputs: the rest of EngineCore._update (detokenization, stop strings, the deltas).
    engine.scheduler.update_from_output = clock.wrap("process", engine.scheduler.update_from_output)
    update = engine._update

    def timed_update(*args: Any, **kwargs: Any) -> Any:
        nested = clock.current["process"] + clock.current["wait"]
        t0 = time.perf_counter()
        try:
            return update(*args, **kwargs)
        finally:
            inside = clock.current["process"] + clock.current["wait"] - nested
            clock.current["outputs"] += time.perf_counter() - t0 - inside

    engine._update = timed_update
    timed_launch = clock.wrap("launch", engine.runner.launch)

    def launch(*args: Any, **kwargs: Any) -> Any:
        handle = timed_launch(*args, **kwargs)
        untimed = handle.results

        def results() -> Any:
            if handle._results is not None:
                return handle._results
            t0 = time.perf_counter()
            try:
                return untimed()
            finally:
                clock.current["wait"] += time.perf_counter() - t0

        handle.results = results
        return handle

    engine.runner.launch = launch
    return clock


def kernel_table(prof: Any, num_steps: int, top: int) -> tuple[list[dict[str, Any]], float]:
    """Device time by kernel name, per step, from a torch.profiler run (CUDA activities)."""
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = totals[evt.name]
        entry[0] += evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
        entry[1] += 1
    busy_us = sum(v[0] for v in totals.values())
    rows = [{"kernel": name[:90], "us_per_step": t / num_steps, "calls_per_step": n / num_steps,
             "share": t / busy_us if busy_us else 0.0}
            for name, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]]
    return rows, busy_us / num_steps


def profile_window(engine: Any, num_steps: int, top: int) -> dict[str, Any]:
    """Step `num_steps` times under torch.profiler; kernel time per step and the GPU's busy share."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    batch = len(engine.scheduler.running)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / num_steps
    rows, busy_us = kernel_table(prof, num_steps, top)
    return {"steps": num_steps, "wall_ms_per_step": wall * 1e3, "gpu_busy_ms_per_step": busy_us / 1e3,
            "gpu_busy_fraction": busy_us / 1e3 / (wall * 1e3), "batch": batch, "kernels": rows,
            "host_ops": host_op_table(prof, num_steps, top)}


def host_op_table(prof: Any, num_steps: int, top: int) -> list[dict[str, Any]]:
    """Host time by operator, per step, from the same trace (CPU activities): what the host does
    while the GPU waits (launches: cudaLaunchKernel, cudaGraphLaunch; torch ops by name)."""
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CPU:
            continue
        entry = totals[evt.name]
        entry[0] += evt.self_cpu_time_total
        entry[1] += 1
    return [{"op": name[:90], "self_us_per_step": t / num_steps, "calls_per_step": n / num_steps}
            for name, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from appliance_bench.offline import _default_tokenizer, build_engine

    from appliance.engine.sequence import SamplingParams

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.tokenizer is None:
        args.tokenizer = _default_tokenizer()
    engine = build_engine(args.model, args, device)
    engine.add_request("warm", [7] * 16, SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))
    while engine.has_unfinished_requests():
        engine.step()
    clock = instrument(engine)
    rng = random.Random(args.seed)
    vocab = engine.vocab_size
    params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True, temperature=0.0)
    steps: list[dict[str, Any]] = []
    prof_summary: dict[str, Any] = {}
    t_start = time.perf_counter()
    for i in range(args.num_requests):
        engine.add_request(f"p{i}", [rng.randrange(vocab) for _ in range(args.prompt_tokens)], params)
    num_decode = 0
    num_steps = 0
    prefill_summary: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        if (device.type == "cuda" and not prefill_summary and args.profile_prefill_steps
                and num_steps == args.profile_prefill_at):
            prefill_summary = profile_window(engine, args.profile_prefill_steps, args.top)
            clock.take()
            num_steps += args.profile_prefill_steps
            continue
        if device.type == "cuda" and not prof_summary and num_decode == args.profile_after:
            prof_summary = profile_window(engine, args.profile_steps, args.top)
            clock.take()
            num_decode += args.profile_steps
            continue
        running_before = len(engine.scheduler.running)
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0
        num_steps += 1
        phases = clock.take()
        launched = engine._in_flight.out if engine._in_flight is not None else None
        tokens = launched.num_batched_tokens if launched is not None else 0
        seqs = len(launched.scheduled) if launched is not None else 0
        kind = "decode" if launched is not None and tokens == seqs else "prefill/mixed"
        if kind == "decode":
            num_decode += 1
        steps.append({"kind": kind, "tokens": tokens, "seqs": seqs, "running_before": running_before,
                      "wall_ms": wall * 1e3, **{f"{k}_ms": v * 1e3 for k, v in phases.items()}})
    elapsed = time.perf_counter() - t_start
    summary: dict[str, Any] = {}
    for kind in ("prefill/mixed", "decode"):
        rows = [s for s in steps if s["kind"] == kind]
        if not rows:
            continue
        summary[kind] = {"steps": len(rows), "total_s": sum(r["wall_ms"] for r in rows) / 1e3,
                         **{f"median_{k}": statistics.median(r.get(k, 0.0) for r in rows)
                            for k in ["wall_ms", "tokens", "seqs"] + [f"{p}_ms" for p in PHASES]}}
    return {"model": args.model, "num_requests": args.num_requests, "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens, "max_num_seqs": engine.scheduler.max_num_seqs,
            "async_scheduling": engine.async_scheduling, "elapsed_s": elapsed,
            "piecewise_sizes": sorted(engine.runner.piecewise), "piecewise_steps": engine.runner.piecewise_steps,
            "output_tok_s": args.num_requests * args.output_tokens / elapsed,
            "by_kind": summary, "profile": prof_summary, "profile_prefill": prefill_summary, "steps": steps if args.keep_steps else []}


def main(argv: list[str] | None = None) -> int:
    from appliance_bench.results import write_result

    parser = argparse.ArgumentParser(prog="python -m appliance_bench.profile_step",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokenizer")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--piecewise-max-tokens", type=int,
                        help="engine.cuda_graph_piecewise_max_tokens (default: the engine's; 0: those steps eager)")
    parser.add_argument("--no-async-scheduling", action="store_true")
    parser.add_argument("--profile-after", type=int, default=40, help="decode steps before the profiled window")
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--profile-prefill-steps", type=int, default=0,
                        help="also profile this many steps from step --profile-prefill-at (prefill under way)")
    parser.add_argument("--profile-prefill-at", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--keep-steps", action="store_true", help="every step's row in the JSON")
    parser.add_argument("--results-dir", type=Path)
    parser.add_argument("--tag", default="", help="appended to the result file's kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.num_requests, args.prompt_tokens, args.output_tokens = "tiny-llama", 4, 24, 8
        args.max_model_len = args.max_model_len or 128
    result = run(args)
    for kind, s in result["by_kind"].items():
        print(f"{kind:14s} steps {s['steps']:4d} total {s['total_s']:7.2f} s  median wall {s['median_wall_ms']:7.2f} ms "
              + " ".join(f"{p} {s[f'median_{p}_ms']:6.2f}" for p in PHASES)
              + f"  tokens {s['median_tokens']:.0f} seqs {s['median_seqs']:.0f}")
    for name in ("profile_prefill", "profile"):
        prof = result[name]
        if prof:
            print(f"{name}: {prof['steps']} steps at batch {prof['batch']}: wall {prof['wall_ms_per_step']:.2f} ms, "
                  f"GPU busy {prof['gpu_busy_ms_per_step']:.2f} ms ({100 * prof['gpu_busy_fraction']:.0f}%)")
            for row in prof["kernels"]:
                print(f"  {row['us_per_step']:9.1f} us {row['calls_per_step']:6.1f}x {100 * row['share']:5.1f}%  "
                      f"{row['kernel']}")
            print("  host, self time per step:")
            for row in prof["host_ops"][:12]:
                print(f"  {row['self_us_per_step']:9.1f} us {row['calls_per_step']:6.1f}x  {row['op']}")
    if result["piecewise_sizes"]:
        print(f"piecewise graphs: {result['piecewise_steps']} steps served, sizes {result['piecewise_sizes']}")
    print(f"output tok/s {result['output_tok_s']:.0f} ({result['elapsed_s']:.2f} s)")
    kind = "profile" + (f"-{args.tag}" if args.tag else "") + ("-smoke" if args.smoke else "")
    print("wrote", write_result(result, kind, args.results_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
