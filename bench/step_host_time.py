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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--modes", default="sync,async", help="sync, async, or legacy (no switch)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating; the best is kept")
    args = parser.parse_args()
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
