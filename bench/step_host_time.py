"""Host time of an engine decode step on CPU: sync loop vs async scheduling.

A tiny dummy Llama (2 layers, hidden 64, vocab 49152) with the default model's tokenizer, N sequences decoding at
once. On CPU nothing runs concurrently, so a step costs host + "device" work in both modes; what
this measures is the host part (everything but the model forward and the sampler's tensor ops),
the time async scheduling hides behind the GPU's forward of the next step. Times are the engine
thread's CPU time (torch runs on that one thread here), so other load on a shared machine
inflates them less than wall time would.

    sync step on a GPU  ~ host + gpu
    async step on a GPU ~ max(host, gpu)   (the next step is queued before the host waits)

    python -m appliance_bench.step_host_time --seqs 256 --steps 40

`--offline`: the whole offline W1 loop instead (bench/offline.py's: 512 requests of 512 random
tokens -> 256, ignore_eos, greedy, all at once, `EngineCore(stream_outputs=False)` stepped until
done; `--loop llm` runs `LLM.generate` instead), with the H200 135M run's number of KV blocks. The
model is a dummy Llama whose forward is a table lookup: the CPU reference attention loops over the
sequences in Python (tens of ms per step at 512), which would bury the host time the GPU sees; the
LM head and the argmax are real, so sampled tokens vary and the real tokenizer detokenizes them.
Per decode step (median over the steps with every request decoding): schedule, launch (the
model runner's host part: the forward, LM head and argmax subtracted), update (the scheduler's
update_from_output), output stage, after_launch, the caller's loop; per run: host and device
seconds and the cyclic GC's collections and time (a full collection walks every tracked object
in the process: on a GPU box with 363k KV blocks that was a pause of a large part of a second,
which per-step medians never show). `--trees label=path,...` runs other checkouts (a
`git worktree` of an older commit) in child processes, alternating, and records all of them:

    git worktree add /tmp/e98 e98ce4e
    python -m appliance_bench.step_host_time --offline --trees e98ce4e=/tmp/e98,head=. --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def build(async_scheduling: bool | None, seqs: int, stream_outputs: bool) -> Any:
    from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from appliance.engine.llm_engine import EngineCore
    from appliance.models.fetch import default_model_dir

    config = EngineConfig(
        model=ModelConfig(model="tiny-llama", load_format="dummy", tokenizer=str(default_model_dir()),
                          device="cpu", dtype="float32"),
        cache=CacheConfig(num_kv_blocks=seqs * 16),
        scheduler=SchedulerConfig(max_model_len=1024, max_num_seqs=seqs, max_num_batched_tokens=8192))
    if async_scheduling is not None:  # None: a tree from before the switch existed
        config = dataclasses.replace(config, async_scheduling=async_scheduling)
    return EngineCore(config, stream_outputs=stream_outputs)


class _Timer:
    """Wraps callables and sums the wall time spent inside them."""

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.thread_time() - t0
        return timed


def measure(async_scheduling: bool | None, seqs: int, steps: int, stream_outputs: bool) -> dict[str, float]:
    from appliance.engine.sequence import SamplingParams

    engine = build(async_scheduling, seqs, stream_outputs)
    device = _Timer()  # the model forward and the sampler: GPU work on a GPU
    model = engine.runner.model
    model.forward = device.wrap(model.forward)
    model.compute_logits = device.wrap(model.compute_logits)
    sampler = engine.runner.sampler
    if hasattr(sampler, "sample_async"):
        sampler.sample_async = device.wrap(sampler.sample_async)
    else:
        sampler.__class__ = type("TimedSampler", (sampler.__class__,),
                                 {"__call__": device.wrap(sampler.__class__.__call__)})
    params = SamplingParams(max_tokens=steps + 40, temperature=0.0, ignore_eos=True)
    for i in range(seqs):
        engine.add_request(f"r{i}", [100 + (i * 7 + j) % 5000 for j in range(32)], params)
    for _ in range(10):  # prefill, then a few decode steps with everyone running
        engine.step()
    assert len(engine.scheduler.running) == seqs
    walls, devs = [], []
    for _ in range(steps):
        device.total = 0.0
        t0 = time.thread_time()
        engine.step()
        walls.append(time.thread_time() - t0)
        devs.append(device.total)
    hosts = [w - d for w, d in zip(walls, devs, strict=True)]
    return {"step_ms": statistics.median(walls) * 1e3, "device_ms": statistics.median(devs) * 1e3,
            "host_ms": statistics.median(hosts) * 1e3}


# ---------------------------------------------------------------------------------------------- offline W1
H200_135M_KV_BLOCKS = 363_390  # the 135M shape's KV blocks on an H200 (bench/results/*-offline.json)
_ARCH = "host-bench-llama"  # a dummy architecture registered at run time (the forward is replaced anyway)


def _offline_config(args: argparse.Namespace) -> dict[str, Any]:
    from appliance.models.dummy_configs import DUMMY_CONFIGS

    arch = dict(DUMMY_CONFIGS["tiny-llama"])
    # One layer of one 8-wide KV head keeps 363k blocks' CPU cache small (the forward never reads it).
    arch.update(vocab_size=args.vocab, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                head_dim=8, hidden_size=64)
    DUMMY_CONFIGS[_ARCH] = arch
    return {"model": _ARCH, "load_format": "dummy", "tokenizer": args.tokenizer, "device": "cpu", "dtype": "float32",
            "num_kv_blocks": args.kv_blocks, "max_model_len": args.prompt_tokens + args.output_tokens + 16,
            "max_num_seqs": 512, "max_num_batched_tokens": 8192}


def _build_offline(args: argparse.Namespace) -> tuple[Any, Any]:
    """(the EngineCore, what to call per iteration of the caller's loop)."""
    flat = _offline_config(args)
    if args.loop == "llm":
        from appliance.engine.llm import LLM

        llm = LLM(**flat)
        return llm.engine, llm
    from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from appliance.engine.llm_engine import EngineCore

    config = EngineConfig(
        model=ModelConfig(model=flat["model"], load_format="dummy", tokenizer=flat["tokenizer"], device="cpu",
                          dtype="float32"),
        cache=CacheConfig(num_kv_blocks=flat["num_kv_blocks"]),
        scheduler=SchedulerConfig(max_model_len=flat["max_model_len"], max_num_seqs=flat["max_num_seqs"],
                                  max_num_batched_tokens=flat["max_num_batched_tokens"]))
    return EngineCore(config, stream_outputs=False), None


class _Phases:
    """Thread CPU time spent in named methods; methods an older tree lacks are skipped."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}

    def wrap(self, obj: Any, name: str, key: str) -> None:
        fn = getattr(obj, name, None)
        if fn is None:
            return
        total = self.total
        total.setdefault(key, 0.0)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                total[key] += time.thread_time() - t0

        setattr(obj, name, timed)


def _instrument(engine: Any, vocab: int) -> _Phases:
    import appliance.engine.sampler as sampler_module

    phases = _Phases()
    model = engine.runner.model
    table = torch.randn(vocab, model.model.embed_tokens.weight.shape[1])

    def forward(input_ids: torch.Tensor, positions: torch.Tensor, *_: Any) -> torch.Tensor:
        return table[(input_ids.long() * 7919 + positions.long() * 104729) % vocab]  # next token: f(token, pos)

    model.forward = forward
    # Device work on a GPU: the forward, the LM head, the argmax and the copy of the sampled ids.
    phases.wrap(model, "forward", "device")
    phases.wrap(model, "compute_logits", "device")
    phases.wrap(sampler_module, "_greedy", "device")
    phases.wrap(sampler_module, "_start_download", "device")
    sched = engine.scheduler
    phases.wrap(sched, "schedule", "schedule")
    phases.wrap(engine.runner, "launch", "launch")
    phases.wrap(sched, "after_launch", "after_launch")
    phases.wrap(engine, "_advance", "after_launch")  # before the redesign (e98ce4e)
    phases.wrap(sched, "update_from_output", "update")
    phases.wrap(engine, "_process", "update")  # e98ce4e
    phases.wrap(engine, "_update", "update_and_output")
    phases.wrap(engine, "_collect_outputs", "output")  # e98ce4e
    phases.wrap(engine, "step", "step")
    return phases


class GcWatch:
    """The cyclic GC's collections and seconds per generation while active (gc.callbacks); also
    used by bench/offline.py around W1."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.count[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._t0

    def __enter__(self) -> GcWatch:
        self.count, self.seconds = [0, 0, 0], [0.0, 0.0, 0.0]
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def record(self) -> dict[str, list[int] | list[float]]:
        return {"gc_collections": list(self.count), "gc_ms": [round(t * 1e3, 1) for t in self.seconds]}


def _w1(engine: Any, llm: Any, phases: _Phases, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from appliance.engine.sequence import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(3, args.vocab) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True, temperature=0.0)
    per_step: list[dict[str, float]] = []
    t_start = time.thread_time()
    wall_start = time.perf_counter()
    if llm is not None:  # LLM.generate: its loop is timed per engine step
        outer = {"t": time.thread_time()}
        step = engine.step

        def stepped() -> Any:  # `loop`: from the end of the previous step to the end of this one
            before = dict(phases.total)
            out = step()
            t1 = time.thread_time()
            per_step.append(_step_record(phases.total, before, t1 - outer["t"]))
            outer["t"] = t1
            return out

        engine.step = stepped
        try:
            results = llm.generate(prompts, params)
        finally:
            engine.step = step
        generated = sum(len(r.outputs[0].token_ids) for r in results)
    else:  # bench/offline.py's loop
        for i, prompt in enumerate(prompts):
            engine.add_request(f"w1-{i}", prompt, params)
        generated = 0
        while engine.has_unfinished_requests():
            before = dict(phases.total)
            t0 = time.thread_time()
            for out in engine.step():
                if out.finished:
                    generated += len(out.outputs[0].token_ids)
            per_step.append(_step_record(phases.total, before, time.thread_time() - t0))
    host_cpu = time.thread_time() - t_start
    assert generated == args.requests * args.output_tokens, generated
    device = sum(s["device"] for s in per_step)
    # Decode steps with every request running: past the prefill chunks, before the first finishes.
    steady = per_step[len(per_step) // 4 : -len(per_step) // 8] or per_step
    median = {k: statistics.median(s[k] for s in steady) * 1e3 for k in per_step[0]}
    return {"steps": len(per_step), "cpu_s": host_cpu, "device_s": device, "host_s": host_cpu - device,
            "wall_s": time.perf_counter() - wall_start, "decode_step_ms": {k: round(v, 4) for k, v in median.items()}}


def _step_record(total: dict[str, float], before: dict[str, float], loop: float) -> dict[str, float]:
    d = {k: total[k] - before.get(k, 0.0) for k in total}
    rec = {"loop": loop, "step": d.get("step", 0.0), "device": d.get("device", 0.0), "schedule": d.get("schedule", 0.0),
           "after_launch": d.get("after_launch", 0.0), "update": d.get("update", 0.0)}
    rec["launch"] = d.get("launch", 0.0) - rec["device"]
    both = d.get("update_and_output")  # EngineCore._update: the scheduler's update, then the output stage
    rec["output"] = d.get("output", 0.0) + (both - rec["update"] if both is not None else 0.0)
    rec["host"] = rec["step"] - rec["device"]
    rec["caller_loop"] = loop - rec["step"]
    rec["other"] = rec["host"] - rec["schedule"] - rec["launch"] - rec["update"] - rec["output"] - rec["after_launch"]
    return rec


def offline_child(args: argparse.Namespace) -> None:
    """One tree (the one on sys.path), several W1 runs on one engine; one JSON line per run."""
    import appliance

    torch.set_num_threads(1)
    engine, llm = _build_offline(args)
    phases = _instrument(engine, args.vocab)
    for rep in range(args.repeats):
        with GcWatch() as watch:
            run = _w1(engine, llm, phases, args, seed=rep)
        run.update(watch.record())
        run["tree"] = str(Path(appliance.__file__).resolve().parent.parent)
        print("RESULT " + json.dumps(run), flush=True)


def _tree_env(tree: Path, scratch: Path) -> dict[str, str]:
    """PYTHONPATH for a child that imports `appliance` and its kernels from `tree` and this bench."""
    links = scratch / tree.name.replace(os.sep, "_")
    links.mkdir(parents=True, exist_ok=True)
    for name, folder in (("appliance_kernels", "kernels"), ("appliance_bench", "bench")):
        target = (tree / folder) if name == "appliance_kernels" else Path(__file__).resolve().parent
        link = links / name
        if not link.exists():
            link.symlink_to(target)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(links)])
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _git_commit(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def offline(args: argparse.Namespace) -> dict[str, Any]:
    trees = [(label, Path(path).resolve()) for label, path in (t.split("=", 1) for t in args.trees.split(","))]
    child_args = ["--offline-child", "--requests", str(args.requests), "--prompt-tokens", str(args.prompt_tokens),
                  "--output-tokens", str(args.output_tokens), "--vocab", str(args.vocab), "--kv-blocks",
                  str(args.kv_blocks), "--loop", args.loop, "--repeats", "1"]
    if args.tokenizer:
        child_args += ["--tokenizer", args.tokenizer]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in trees}
    with tempfile.TemporaryDirectory() as scratch:
        for rep in range(args.repeats):
            # Alternate the order: other load on a shared machine comes and goes.
            for label, tree in trees if rep % 2 == 0 else list(reversed(trees)):
                # NOTE: cwd=tree: `python -m` puts the working directory first on sys.path.
                proc = subprocess.run([sys.executable, "-m", "appliance_bench.step_host_time", *child_args],
                                      env=_tree_env(tree, Path(scratch)), cwd=tree, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    raise RuntimeError(f"{label} ({tree}) failed:\n{proc.stderr[-3000:]}")
                run = json.loads(lines[-1].removeprefix("RESULT "))
                if Path(run["tree"]) != tree:
                    raise RuntimeError(f"{label}: the child imported appliance from {run['tree']}, not {tree}")
                runs[label].append(run)
                step = run["decode_step_ms"]
                print(f"{label:12s} host {run['host_s']:6.3f} s, per decode step: host {step['host']:.3f} ms = "
                      + " ".join(f"{k} {step[k]:.3f}" for k in ("schedule", "launch", "update", "output",
                                                                  "after_launch", "other"))
                      + f", caller {step['caller_loop']:.3f}; gc {run['gc_collections']} {run['gc_ms']} ms",
                      flush=True)
    summary = {}
    for label, tree in trees:
        best = min(runs[label], key=lambda r: r["decode_step_ms"]["host"])
        summary[label] = {"commit": _git_commit(tree), "best_decode_step_ms": best["decode_step_ms"],
                          "median_host_s": statistics.median(r["host_s"] for r in runs[label]),
                          "median_decode_step_host_ms": statistics.median(r["decode_step_ms"]["host"]
                                                                          for r in runs[label])}
    return {"runs": runs, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--modes", default="sync,async", help="sync, async, or legacy (no switch)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating; the best is kept")
    offline_group = parser.add_argument_group("offline W1 (--offline)")
    offline_group.add_argument("--offline", action="store_true", help="the whole offline W1 loop, per-phase")
    offline_group.add_argument("--offline-child", action="store_true", help=argparse.SUPPRESS)
    offline_group.add_argument("--trees", default="head=.", help="label=checkout,... (default: %(default)s)")
    offline_group.add_argument("--loop", choices=["core", "llm"], default="core",
                               help="core: EngineCore.step() as bench/offline.py; llm: LLM.generate")
    offline_group.add_argument("--requests", type=int, default=512)
    offline_group.add_argument("--prompt-tokens", type=int, default=512)
    offline_group.add_argument("--output-tokens", type=int, default=256)
    offline_group.add_argument("--vocab", type=int, default=8192, help="the dummy model's vocabulary")
    offline_group.add_argument("--kv-blocks", type=int, default=H200_135M_KV_BLOCKS)
    offline_group.add_argument("--tokenizer", help="default: the embedded model's")
    offline_group.add_argument("--results-dir", type=Path, help="where the JSON goes (default: bench/results)")
    args = parser.parse_args(argv)
    if args.offline or args.offline_child:
        if args.tokenizer is None:
            from appliance.models.fetch import default_model_dir

            args.tokenizer = str(default_model_dir())
        if args.offline_child:
            offline_child(args)
            return
        from appliance_bench.results import write_result

        record = offline(args)
        workload = {k: getattr(args, k) for k in ("requests", "prompt_tokens", "output_tokens", "vocab",
                                                  "kv_blocks", "loop", "repeats", "trees")}
        print("wrote", write_result({"benchmark": "step-host-time-offline-w1", "workload": workload, **record},
                                    "host-offline-w1", args.results_dir))
        return
    torch.set_num_threads(1)  # the CPU is shared; one thread keeps the numbers comparable
    flags = {"sync": False, "async": True, "legacy": None}
    modes = args.modes.split(",")
    results: dict[str, dict[str, float]] = {}
    for stream in (True, False):
        for rep in range(args.repeats):
            # Alternate the order: other load on a shared machine comes and goes.
            for mode in modes if rep % 2 == 0 else reversed(modes):
                key = f"{mode}/{'stream' if stream else 'final-only'}"
                got = measure(flags[mode], args.seqs, args.steps, stream)
                print(f"{key:22s} " + "  ".join(f"{k} {v:7.2f}" for k, v in got.items()), flush=True)
                best = results.setdefault(key, got)
                for k, v in got.items():
                    best[k] = min(best[k], v)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
