"""Our daemon against vLLM's server, both driven by `vllm bench serve` (../shared/peer/serve-bench.sh
writes one result JSON per workload and server into a folder per run): medians over the runs of
each server, the spread, and our figure over vLLM's, checked against issue 9's targets.

    python -m appliance_bench.serve_pairs --ours DIR [DIR ...] --vllm DIR [DIR ...] \
        [--label 8b] [--device "NVIDIA H200"] [--commit SHA] [--out FILE.json]

Each DIR holds `<workload>_<ours|vllm>.json` for the workloads w1, prefix, c1 and rate24 (any may
be missing). Ratios are ours / vLLM: above 1 is better for throughputs, below 1 for latencies.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
from pathlib import Path
from typing import Any

WORKLOADS = ("w1", "prefix", "c1", "rate24")
FIGURES = ("output_throughput", "total_token_throughput", "median_ttft_ms", "p99_ttft_ms",
           "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms")
HIGHER_IS_BETTER = {"output_throughput", "total_token_throughput"}


def load_runs(dirs: list[Path], server: str) -> dict[str, list[dict[str, Any]]]:
    """workload -> the result JSONs of that workload, one per run folder that has it."""
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in WORKLOADS}
    for folder in dirs:
        for workload in WORKLOADS:
            path = folder / f"{workload}_{server}.json"
            if path.exists():
                runs[workload].append(json.loads(path.read_text()))
    return runs


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and spread (min, max) of each figure over the runs; failed requests summed."""
    out: dict[str, Any] = {"runs": len(results), "failed": sum(int(r.get("failed", 0)) for r in results)}
    for figure in FIGURES:
        values = [float(r[figure]) for r in results if r.get(figure) is not None]
        if values:
            out[figure] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                           "values": values}
    return out


def compare(ours: dict[str, Any], vllm: dict[str, Any]) -> dict[str, float]:
    """ours / vLLM for every figure both have (medians)."""
    return {f: ours[f]["median"] / vllm[f]["median"] for f in FIGURES
            if f in ours and f in vllm and vllm[f]["median"]}


def targets(summary: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """Issue 9's targets that a serve-bench pair can decide (the offline ones need bench/offline.py)."""
    checks: dict[str, bool] = {}
    ratio = {w: s["ours_over_vllm"] for w, s in summary.items() if "ours_over_vllm" in s}
    ours = {w: s["ours"] for w, s in summary.items() if "ours" in s}
    if "w1" in ratio:
        checks["w1_output_throughput >= 1.15x vLLM"] = ratio["w1"].get("output_throughput", 0) >= 1.15
    if "rate24" in ratio:
        for f in ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms"):
            if f in ratio["rate24"]:
                checks[f"rate24 {f} <= vLLM"] = ratio["rate24"][f] <= 1.0
    if "c1" in ratio:
        checks["c1 median_ttft_ms <= 0.9x vLLM"] = ratio["c1"].get("median_ttft_ms", 9) <= 0.9
        checks["c1 median_tpot_ms <= vLLM"] = ratio["c1"].get("median_tpot_ms", 9) <= 1.0
    if "prefix" in ratio:
        checks["prefix output_throughput >= 1.2x vLLM"] = ratio["prefix"].get("output_throughput", 0) >= 1.2
        checks["prefix median_ttft_ms <= vLLM"] = ratio["prefix"].get("median_ttft_ms", 9) <= 1.0
    for w, s in ours.items():
        if "median_itl_ms" in s and "median_tpot_ms" in s:
            checks[f"{w} ITL p50 <= 1.1x TPOT p50 (ours)"] = (
                s["median_itl_ms"]["median"] <= 1.1 * s["median_tpot_ms"]["median"])
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", type=Path, nargs="+", required=True)
    parser.add_argument("--vllm", type=Path, nargs="+", required=True)
    parser.add_argument("--label", default="8b")
    parser.add_argument("--device", default="NVIDIA H200")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    ours_runs, vllm_runs = load_runs(args.ours, "ours"), load_runs(args.vllm, "vllm")
    summary: dict[str, dict[str, Any]] = {}
    for workload in WORKLOADS:
        entry: dict[str, Any] = {}
        if ours_runs[workload]:
            entry["ours"] = summarise(ours_runs[workload])
        if vllm_runs[workload]:
            entry["vllm"] = summarise(vllm_runs[workload])
        if "ours" in entry and "vllm" in entry:
            entry["ours_over_vllm"] = compare(entry["ours"], entry["vllm"])
        if entry:
            summary[workload] = entry
    result = {"what": "serve-bench.sh pairs: our daemon vs vLLM 0.26.0, same client (vllm bench serve)",
              "device": args.device, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "commit": args.commit, "label": args.label, "workloads": summary, "targets": targets(summary)}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    for workload, entry in summary.items():
        for f, r in entry.get("ours_over_vllm", {}).items():
            print(f"{args.label} {workload:7s} {f:24s} ours {entry['ours'][f]['median']:10.2f}  "
                  f"vllm {entry['vllm'][f]['median']:10.2f}  ratio {r:5.2f}")
    for name, ok in result["targets"].items():
        print(f"{'MET ' if ok else 'MISS'} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
