"""The result of `bench serve`: one JSON file (header, workload, each run, the capacity answer)
and a text table on stdout, one column per load point."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from appliance import __version__


def client_commit() -> str:
    """The checkout's short commit ($LLM_APPLIANCE_COMMIT on copies without .git), as bench/results.py."""
    env = os.environ.get("LLM_APPLIANCE_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def header() -> dict[str, Any]:
    return {"benchmark": "bench-serve", "llm_appliance": __version__, "commit": client_commit(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "client_host": platform.node()}


def result_path(directory: Path, name: str | None, label: str) -> Path:
    if name:
        return directory / (name if name.endswith(".json") else name + ".json")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower() or "serve"
    return directory / f"{stamp}-{slug}-serve.json"


def _clean(value: Any) -> Any:
    """JSON has no Infinity/NaN: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean({**header(), **payload}), indent=1, allow_nan=False) + "\n")
    return path


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(runs: list[dict[str, Any]], percentiles: list[str]) -> str:
    """Rows of figures, one column per run."""
    def load(run: dict[str, Any]) -> str:
        rate, conc = run["load"]["rate"], run["load"]["concurrency"]
        return f"c={conc}" if conc is not None and rate == "inf" else (
            f"{rate} r/s" + (f" c={conc}" if conc is not None else ""))

    rows: list[tuple[str, list[str]]] = [("load", [load(r) for r in runs])]
    rows.append(("completed / failed", [f"{r['completed']} / {r['failed']}" for r in runs]))
    rows.append(("duration s", [_fmt(r["duration_s"], 2) for r in runs]))
    rows.append(("request throughput req/s", [_fmt(r["request_throughput"], 2) for r in runs]))
    rows.append(("output throughput tok/s", [_fmt(r["output_throughput"]) for r in runs]))
    rows.append(("total throughput tok/s", [_fmt(r["total_token_throughput"]) for r in runs]))
    if any("request_goodput" in r for r in runs):
        rows.append(("goodput req/s", [_fmt(r.get("request_goodput"), 2) for r in runs]))
    for metric, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E")):
        for stat in ["mean", *percentiles]:
            rows.append((f"{label} {stat} ms", [_fmt(r["latency_ms"][metric][stat], 2) for r in runs]))
    rows.append(("server KV usage max %", [_gauge(r, "kv_cache_usage", 100.0) for r in runs]))
    rows.append(("server waiting max", [_gauge(r, "requests_waiting") for r in runs]))
    rows.append(("server preemptions", [_counter(r, "preemptions") for r in runs]))
    if any("slos" in r for r in runs):
        rows.append(("SLOs met", ["yes" if r["slos"]["met"] else "no" for r in runs]))
    width = max(len(name) for name, _ in rows)
    col = max(12, *(len(v) for _, vals in rows for v in vals))
    return "\n".join(f"{name:<{width}}  " + "  ".join(f"{v:>{col}}" for v in vals) for name, vals in rows)


def _gauge(run: dict[str, Any], field: str, scale: float = 1.0) -> str:
    server = run.get("server_metrics") or {}
    value = server.get(field)
    return "n/a" if value is None else _fmt(value["max"] * scale, 1)


def _counter(run: dict[str, Any], field: str) -> str:
    server = run.get("server_metrics") or {}
    value = server.get(field)
    return "n/a" if value is None else _fmt(value, 0)


# A client whose event loop runs this late at p99 stamps its chunks late by as much.
LOOP_LAG_WARN_MS = 5.0


def warnings_text(runs: list[dict[str, Any]]) -> str:
    """One line per run in which the client itself was too busy for its figures to be the server's."""
    lines = []
    for run in runs:
        lag = run.get("client_loop_lag_ms") or {}
        p99 = lag.get("p99")
        if p99 is None or p99 < LOOP_LAG_WARN_MS:
            continue
        itl = run["latency_ms"]["itl"].get("p50")
        lines.append(
            f"warning at {run['load']['rate']} r/s c={run['load']['concurrency']}: this client's event loop ran "
            f"{p99:.1f} ms late at p99 (max {lag['max']:.1f} ms), so chunk times carry up to that much of the "
            f"client's own delay" + (f" (ITL p50 {itl:.2f} ms)" if itl is not None else "")
            + ": run it on a machine with idle cores, or fewer streams, to measure the server")
    return "\n".join(lines)


def errors_text(runs: list[dict[str, Any]]) -> str:
    lines = []
    for run in runs:
        for kind, info in run["errors"].items():
            lines.append(f"errors at {run['load']['rate']} r/s c={run['load']['concurrency']}: {kind} x{info['count']}")
            for message, count in info["messages"].items():
                lines.append(f"  {count} x {message}")
    return "\n".join(lines)
