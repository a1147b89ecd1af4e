"""Our `llm-appliance bench serve` against `vllm bench serve` on the same server and workload.

    python bench/compare_bench_serve.py OURS.json VLLM.json [--run 0] [--tolerance 0.03]
    python bench/compare_bench_serve.py --ours A1.json A2.json --vllm B1.json B2.json

OURS.json: the result of `llm-appliance bench serve` (`--run` picks the load point, default the
first); VLLM.json: `vllm bench serve --save-result`. With several files per side (alternated
repeats: serving figures move by up to 25% between runs, ../shared/peer/README.md) each figure is
the median over that side's files. Prints each figure, ours / vLLM's, and
whether the ratio is within the tolerance; exits 1 if any compared figure is not (figures one side
lacks are shown and skipped). Throughputs: request, output and total tokens per second; latencies:
p50 and p99 of TTFT, TPOT and ITL (vLLM writes p50 as `median_*`). `--json FILE` writes the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def median_doc(docs: list[dict[str, Any]], paths: list[tuple[str, ...]]) -> dict[str, Any]:
    """One document holding, at each path, the median over `docs` (None if any lacks it)."""
    out: dict[str, Any] = {}
    for path in paths:
        values = [_get(d, path) for d in docs]
        if len(docs) == 1:
            value = values[0]
        elif all(isinstance(v, int | float) for v in values):
            value = statistics.median(values)
        else:
            value = None
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


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
    parser.add_argument("pair", type=Path, nargs="*", help="OURS.json VLLM.json")
    parser.add_argument("--ours", type=Path, nargs="+", default=[], help="our result file(s)")
    parser.add_argument("--vllm", type=Path, nargs="+", default=[], help="vLLM's result file(s)")
    parser.add_argument("--run", type=int, default=0, help="which of our load points (default: the first)")
    parser.add_argument("--tolerance", type=float, default=0.03, help="relative (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    args = parser.parse_args(argv)
    if args.pair:
        if len(args.pair) != 2 or args.ours or args.vllm:
            parser.error("give OURS.json VLLM.json, or --ours FILE... --vllm FILE...")
        args.ours, args.vllm = [args.pair[0]], [args.pair[1]]
    if not args.ours or not args.vllm:
        parser.error("need our result(s) and vLLM's")
    our_runs = [our_run(json.loads(p.read_text()), args.run) for p in args.ours]
    ours = median_doc(our_runs, [k for _, k, _ in COUNTS + FIGURES])
    vllm = median_doc([json.loads(p.read_text()) for p in args.vllm], [(k,) for _, _, k in COUNTS + FIGURES])
    rows = compare(ours, vllm, args.tolerance)
    print(f"ours: {', '.join(map(str, args.ours))} (run {args.run}, load {our_runs[0].get('load')})\n"
          f"vLLM: {', '.join(map(str, args.vllm))}" + ("\n(medians over the files)" if
                                                      len(args.ours) > 1 or len(args.vllm) > 1 else ""))
    print(f"{'figure':<28} {'ours':>12} {'vLLM':>12} {'ours/vLLM':>10}")
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        flag = "" if row["within"] is None else ("  ok" if row["within"] else f"  OFF by more than {args.tolerance:.0%}")
        print(f"{row['figure']:<28} {_fmt(row['ours']):>12} {_fmt(row['vllm']):>12} {ratio:>10}{flag}")
    compared = [r for r in rows if r["within"] is not None]
    if args.json:
        args.json.write_text(json.dumps({"ours": [str(p) for p in args.ours], "vllm": [str(p) for p in args.vllm],
                                         "run": args.run,
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
