"""Our `llm-appliance bench serve` against `vllm bench serve` on the same server and workload.

    python bench/compare_bench_serve.py OURS.json VLLM.json [--run 0] [--tolerance 0.03]

OURS.json: the result of `llm-appliance bench serve` (`--run` picks the load point, default the
first); VLLM.json: `vllm bench serve --save-result`. Prints each figure, ours / vLLM's, and
whether the ratio is within the tolerance; exits 1 if any compared figure is not (figures one side
lacks are shown and skipped). Throughputs: request, output and total tokens per second; latencies:
p50 and p99 of TTFT, TPOT and ITL (vLLM writes p50 as `median_*`). `--json FILE` writes the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# (name, key in our run, key in vLLM's result)
FIGURES: list[tuple[str, tuple[str, ...], str]] = [
    ("request throughput (req/s)", ("request_throughput",), "request_throughput"),
    ("output throughput (tok/s)", ("output_throughput",), "output_throughput"),
    ("total throughput (tok/s)", ("total_token_throughput",), "total_token_throughput"),
    *[(f"{p} {m.upper()} (ms)", ("latency_ms", m, p), f"{'median' if p == 'p50' else p}_{m}_ms")
      for m in ("ttft", "tpot", "itl") for p in ("p50", "p99")],
]
COUNTS: list[tuple[str, tuple[str, ...], str]] = [
    ("completed", ("completed",), "completed"),
    ("failed", ("failed",), "failed"),
    ("input tokens", ("total_input_tokens",), "total_input_tokens"),
    ("output tokens", ("total_output_tokens",), "total_output_tokens"),
]


def _get(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = doc
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def our_run(doc: dict[str, Any], index: int) -> dict[str, Any]:
    runs = doc.get("runs") or [p["run"] for p in doc.get("capacity", {}).get("probes", [])]
    if not runs:
        raise ValueError("no runs in our result")
    if not -len(runs) <= index < len(runs):
        raise ValueError(f"--run {index}: our result has {len(runs)} run(s)")
    return runs[index]


def compare(ours: dict[str, Any], vllm: dict[str, Any], tolerance: float) -> list[dict[str, Any]]:
    rows = []
    for name, our_key, vllm_key in COUNTS + FIGURES:
        a, b = _get(ours, our_key), vllm.get(vllm_key)
        row: dict[str, Any] = {"figure": name, "ours": a, "vllm": b, "ratio": None, "within": None}
        if (name, our_key, vllm_key) in FIGURES and isinstance(a, int | float) and isinstance(b, int | float) and b:
            row["ratio"] = a / b
            row["within"] = abs(a / b - 1) <= tolerance
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ours", type=Path)
    parser.add_argument("vllm", type=Path)
    parser.add_argument("--run", type=int, default=0, help="which of our load points (default: the first)")
    parser.add_argument("--tolerance", type=float, default=0.03, help="relative (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    args = parser.parse_args(argv)
    ours = our_run(json.loads(args.ours.read_text()), args.run)
    vllm = json.loads(args.vllm.read_text())
    rows = compare(ours, vllm, args.tolerance)
    print(f"ours: {args.ours} (run {args.run}, load {ours.get('load')})\nvLLM: {args.vllm}")
    print(f"{'figure':<28} {'ours':>12} {'vLLM':>12} {'ours/vLLM':>10}")
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        flag = "" if row["within"] is None else ("  ok" if row["within"] else f"  OFF by more than {args.tolerance:.0%}")
        print(f"{row['figure']:<28} {_fmt(row['ours']):>12} {_fmt(row['vllm']):>12} {ratio:>10}{flag}")
    compared = [r for r in rows if r["within"] is not None]
    if args.json:
        args.json.write_text(json.dumps({"ours": str(args.ours), "vllm": str(args.vllm), "run": args.run,
                                         "tolerance": args.tolerance, "rows": rows}, indent=1) + "\n")
    if not compared:
        print("nothing to compare")
        return 1
    bad = [r["figure"] for r in compared if not r["within"]]
    print(f"{len(compared) - len(bad)}/{len(compared)} figures within {args.tolerance:.0%}"
          + (f"; off: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
