"""The engine phase of bench/longctx.py: our daemon and vLLM's server, one after the other on the
same GPU, driven by the same client (appliance.benchserve's streaming client, run in this process:
no client process to start, and prompts of exact token counts built once for every server).

Workloads (issue 13), after an unmeasured warm-up (4 prompts of 4k tokens at once, 16 tokens each):
- mixed: 32 prompts of 8k tokens and 8 of 32k sent at once (shuffled, a fixed order), 64 output
  tokens each (ignore_eos); figure: total tok/s, (input + output tokens) / (first send to last answer);
- alone: one 32k prompt at a time, three different prompts (a repeated one would hit the prefix
  cache), 64 output tokens each; figures: median TTFT and median TPOT of the three.

Every server gets the same prompts (text of an exact token count under the served tokenizer, BOS
included, as `vllm bench serve --dataset-name random` builds them). A server is started in a process
group of its own, waited for on GET /health, and stopped (SIGINT, then SIGKILL) with everything it
spawned before the next one starts, so each has the whole GPU.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shlex
import signal
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from appliance.benchserve import workload
from appliance.benchserve.client import ClientConfig
from appliance.benchserve.runner import LoadPoint, RunOptions, run_point

# Start-up lines worth keeping: ours (engine ready / KV cache / graphs), vLLM's (KV cache, concurrency,
# graph capture, start-up timing, compile, attention backend).
LOG_HIGHLIGHTS = (r"engine ready|KV cache|captured \d+ CUDA graphs|Maximum concurrency|Available KV cache|"
                  r"GPU KV cache size|Graph capturing finished|init engine|torch\.compile takes|"
                  r"Using .* backend|Traceback|Error")


@dataclass(frozen=True)
class Sizes:
    """Prompt lengths and counts of the workloads (the issue's, or tiny ones for the CPU smoke run)."""

    short_len: int = 8192
    long_len: int = 32768
    num_short: int = 32
    num_long: int = 8
    out_tokens: int = 64
    alone_repeats: int = 3
    warmup_len: int = 4096
    warmup_num: int = 4
    warmup_out: int = 16


SMOKE_SIZES = Sizes(short_len=48, long_len=160, num_short=3, num_long=1, out_tokens=4, alone_repeats=3,
                    warmup_len=32, warmup_num=2, warmup_out=2)


@dataclass
class Prompts:
    warmup: list[workload.BenchRequest]
    mixed: list[workload.BenchRequest]
    alone: list[workload.BenchRequest]
    build_s: float = 0.0


def build_prompts(tokenizer_dir: str, sizes: Sizes, seed: int = 13) -> Prompts:
    """The three request lists, from distinct seeds (no prompt shares a prefix with another)."""
    t0 = time.perf_counter()
    tok = workload.load_tokenizer(tokenizer_dir)

    def make(n: int, length: int, out: int, seed_: int) -> list[workload.BenchRequest]:
        spec = workload.WorkloadSpec("random", n, workload.LengthRange(length, length),
                                     workload.LengthRange(out, out), seed=seed_)
        return workload.build(spec, tok)

    mixed = (make(sizes.num_short, sizes.short_len, sizes.out_tokens, seed)
             + make(sizes.num_long, sizes.long_len, sizes.out_tokens, seed + 1))
    random.Random(seed).shuffle(mixed)
    mixed = [replace(r, index=i) for i, r in enumerate(mixed)]
    return Prompts(warmup=make(sizes.warmup_num, sizes.warmup_len, sizes.warmup_out, seed + 2), mixed=mixed,
                   alone=make(sizes.alone_repeats, sizes.long_len, sizes.out_tokens, seed + 3),
                   build_s=time.perf_counter() - t0)


@dataclass
class Server:
    """One server command; `start` runs it in its own process group with stdout/stderr to `log`."""

    label: str
    cmd: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log: Path) -> None:
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{self.label}] starting: {' '.join(shlex.quote(c) for c in self.cmd)}"
              + "".join(f" ({k}={v})" for k, v in self.env.items()), flush=True)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env}, cwd=self.cwd, start_new_session=True)
        self.started_at = time.monotonic()

    def wait_healthy(self, deadline: float) -> float:
        """Seconds from start to a 200 on GET /health; RuntimeError if the server exits or the
        deadline (time.monotonic()) passes first."""
        assert self.proc is not None
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - self.started_at
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with status {self.proc.returncode} before it was healthy:\n"
                                   + self.log_tail())
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label} not healthy after {time.monotonic() - self.started_at:.0f} s "
                                   "(out of time):\n" + self.log_tail())
            time.sleep(0.5)

    def stop(self, grace_s: float = 20.0) -> float:
        """SIGINT to the whole group, SIGKILL after `grace_s`; returns once no process of the
        group is left (the GPU memory is the next server's). Seconds it took."""
        if self.proc is None:
            return 0.0
        t0 = time.monotonic()
        pgid = self.proc.pid
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + wait_s
            while time.monotonic() < end and _group_alive(pgid):
                self.proc.poll()
                time.sleep(0.2)
            if not _group_alive(pgid):
                break
        self.proc.wait()
        self.proc = None
        return time.monotonic() - t0

    def log_lines(self, pattern: str, limit: int = 20) -> list[str]:
        """The log's lines matching `pattern` (a regex), the last `limit` of them."""
        if self.log is None or not self.log.exists():
            return []
        found = re.compile(pattern)
        return [ln.strip()[:400] for ln in self.log.read_text(errors="replace").splitlines() if found.search(ln)][-limit:]

    def log_tail(self, chars: int = 3000) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _median(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _requests(run: dict[str, Any]) -> list[dict[str, Any]]:
    cols = run["requests"]["columns"]
    return [dict(zip(cols, row, strict=True)) for row in run["requests"]["rows"]]


async def _measure(config: ClientConfig, prompts: Prompts, out: dict[str, Any], label: str) -> None:
    """Warm-up, mixed, alone; each figure into `out` as soon as it is measured (a run cut short by
    the deadline keeps the mixed workload's)."""
    options = RunOptions(sample_server_metrics=False, progress=False)
    warm = await run_point(config, prompts.warmup, LoadPoint(), seed=0, options=options)
    if warm["failed"]:
        raise RuntimeError(f"warm-up failed: {warm['errors']}")
    mixed = await run_point(config, prompts.mixed, LoadPoint(), seed=0, options=options)
    out["mixed"] = {
        "requests": len(prompts.mixed), "failed": mixed["failed"], "errors": mixed["errors"],
        "duration_s": mixed["duration_s"], "total_input_tokens": mixed["total_input_tokens"],
        "total_output_tokens": mixed["total_output_tokens"],
        "total_tok_s": mixed["total_token_throughput"], "output_tok_s": mixed["output_throughput"],
        "median_ttft_ms": mixed["latency_ms"]["ttft"]["p50"], "median_tpot_ms": mixed["latency_ms"]["tpot"]["p50"],
    }
    m = out["mixed"]
    print(f"[{label}] mixed {m['requests']} prompts: {m['total_tok_s']:.0f} total tok/s ({m['duration_s']:.1f} s, "
          f"{m['failed']} failed)", flush=True)
    alone = await run_point(config, prompts.alone, LoadPoint(concurrency=1), seed=0, options=options)
    rows = [r for r in _requests(alone) if r["error_kind"] is None]
    out["alone"] = {
        "requests": len(prompts.alone), "failed": alone["failed"], "errors": alone["errors"],
        "prompt_tokens": [r["prompt_tokens"] for r in rows], "output_tokens": [r["output_tokens"] for r in rows],
        "ttft_ms": [r["ttft_ms"] for r in rows], "tpot_ms": [r["tpot_ms"] for r in rows],
        "median_ttft_ms": _median([r["ttft_ms"] for r in rows]),
        "median_tpot_ms": _median([r["tpot_ms"] for r in rows if r["tpot_ms"] is not None]),
    }
    a = out["alone"]
    print(f"[{label}] alone: median TTFT {_fmt(a['median_ttft_ms'])} ms, TPOT {_fmt(a['median_tpot_ms'])} ms "
          f"(TTFTs {a['ttft_ms']}, {a['failed']} failed)", flush=True)


def measure_server(server: Server, prompts: Prompts, deadline: float, *, max_start_s: float,
                   model: str = "m") -> dict[str, Any]:
    """Wait for the (started) server, at most max_start_s from its start, run the workloads by
    `deadline` (time.monotonic()), stop it. Never raises: failures are recorded with the server
    log's tail."""
    result: dict[str, Any] = {"command": server.cmd, "env": server.env}
    try:
        result["healthy_after_s"] = server.wait_healthy(min(deadline, server.started_at + max_start_s))
        print(f"[{server.label}] healthy after {result['healthy_after_s']:.1f} s", flush=True)
        timeout = max(10.0, deadline - time.monotonic())
        config = ClientConfig(base_url=server.url, model=model, ignore_eos=True, request_timeout_s=timeout)
        t0 = time.monotonic()
        asyncio.run(asyncio.wait_for(_measure(config, prompts, result, server.label), timeout))
        result["workloads_s"] = time.monotonic() - t0
    except (RuntimeError, TimeoutError, OSError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        print(f"[{server.label}] FAILED: {result['error'][:2000]}", flush=True)
    finally:
        result["stop_s"] = server.stop()
        result["log_tail"] = server.log_tail(1500)
        # What each server says about its memory and start-up (ours: KV blocks at max_model_len).
        result["log_highlights"] = server.log_lines(LOG_HIGHLIGHTS)
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def ratios(ours: dict[str, Any], vllm: dict[str, Any]) -> dict[str, float | None]:
    """ours / vLLM: above 1 is better for tok/s, below 1 for TTFT and TPOT."""

    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    out: dict[str, float | None] = {}
    for key, name, figure in (("mixed_total_tok_s", "mixed", "total_tok_s"),
                              ("alone_median_ttft", "alone", "median_ttft_ms"),
                              ("alone_median_tpot", "alone", "median_tpot_ms")):
        if name in ours and name in vllm:  # a run cut short may lack its later workloads
            out[key] = div(ours[name][figure], vllm[name][figure])
    return out


def targets(r: dict[str, float | None]) -> dict[str, bool | None]:
    """Issue 13's serving targets, decided from `ratios`."""

    def check(value: float | None, ok: bool) -> bool | None:
        return None if value is None else ok

    mixed, ttft, tpot = r.get("mixed_total_tok_s"), r.get("alone_median_ttft"), r.get("alone_median_tpot")
    return {
        "mixed total tok/s >= 1.2x vLLM": check(mixed, mixed is not None and mixed >= 1.2),
        "32k alone TTFT <= 0.9x vLLM": check(ttft, ttft is not None and ttft <= 0.9),
        "32k alone TPOT <= vLLM": check(tpot, tpot is not None and tpot <= 1.0),
    }
