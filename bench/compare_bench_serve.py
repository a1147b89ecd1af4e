"""Our `llm-appliance bench serve` against `vllm bench serve` on the same server and workload.

    python bench/compare_bench_serve.py OURS.json VLLM.json [--run 0] [--tolerance 0.03]
    python bench/compare_bench_serve.py --ours A1.json A2.json --vllm B1.json B2.json
    python bench/compare_bench_serve.py --crosscheck DIR --json DIR/crosscheck.json

OURS.json: the result of `llm-appliance bench serve` (`--run` picks the load point, default the
first); VLLM.json: `vllm bench serve --save-result`. With several files per side (alternated
repeats: serving figures move by up to 25% between runs, ../shared/peer/README.md) each figure is
the median over that side's files. Prints each figure, ours / vLLM's, and whether the ratio is
within the tolerance; exits 1 if any compared figure is not (figures one side lacks are shown and
skipped). Throughputs: request, output and total tokens per second; latencies: p50 and p99 of
TTFT, TPOT and ITL (vLLM writes p50 as `median_*`). `--json FILE` writes the table.

`--crosscheck DIR` reads what bench/crosscheck_bench_serve.sh left there (runs.tsv, each run's
JSON, the server's /metrics before and after each run, meta.json) and writes one document for
bench/results/: per workload, every run's figures, the medians per client with their spread and the
ratio of medians; each client's rounds pooled (every request of every round as one sample, through
our arithmetic on both clients' per-request records) with the ratio and the verdict against the
tolerance (on the medians where a client left no per-request records); the server's own count of the tokens each
run cost it (the same workload, seen from the server) and its mean TTFT/ITL/E2E per client's runs
(so a difference the server made is told from one the clients measured); and the arithmetic check: each vLLM run's
figures recomputed by our `metrics.summarize` from vLLM's own per-request records
(`--save-detailed`), which must agree to rounding.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from appliance.benchserve import metrics
from appliance.benchserve.record import RequestRecord
from appliance.benchserve.server_metrics import parse as parse_prometheus

# (name, key in our run, key in vLLM's result)
FIGURES: list[tuple[str, tuple[str, ...], str]] = [
    ("request throughput (req/s)", ("request_throughput",), "request_throughput"),
    ("output throughput (tok/s)", ("output_throughput",), "output_throughput"),
    ("total throughput (tok/s)", ("total_token_throughput",), "total_token_throughput"),
    *[(f"{p} {m.upper()} (ms)", ("latency_ms", m, p), f"{'median' if p == 'p50' else p}_{m}_ms")
      for m in ("ttft", "tpot", "itl") for p in ("p50", "p99")],
]
# Shown, not judged.
COUNTS: list[tuple[str, tuple[str, ...], str]] = [
    ("completed", ("completed",), "completed"),
    ("failed", ("failed",), "failed"),
    ("input tokens", ("total_input_tokens",), "total_input_tokens"),
    ("output tokens", ("total_output_tokens",), "total_output_tokens"),
    ("duration (s)", ("duration_s",), "duration"),
    ("p50 E2E (ms)", ("latency_ms", "e2el", "p50"), "median_e2el_ms"),
    ("mean TTFT (ms)", ("latency_ms", "ttft", "mean"), "mean_ttft_ms"),
    ("mean ITL (ms)", ("latency_ms", "itl", "mean"), "mean_itl_ms"),
]
JUDGED = {name for name, _, _ in FIGURES}
# Our arithmetic on vLLM's records vs vLLM's own figures: rounding only. On the H200 (b8848ea) the
# two agreed within 2.1e-7 relative on every figure but the std of E2E at one request at a time
# (1.1e-4 relative: 16 nearly equal E2Es of ~607 ms, a std under 1 ms, off by tens of ns); a
# nanosecond/1e-9 bound failed those runs on float rounding. A microsecond is far below any figure.
IDENTITY_REL = 1e-6
IDENTITY_ABS = 1e-3  # ms


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


def our_figures(run: dict[str, Any]) -> dict[str, Any]:
    return {name: _get(run, ours) for name, ours, _ in COUNTS + FIGURES}


def vllm_figures(doc: dict[str, Any]) -> dict[str, Any]:
    return {name: doc.get(key) for name, _, key in COUNTS + FIGURES}


def _median(values: list[Any]) -> Any:
    if len(values) == 1:
        return values[0]
    if values and all(isinstance(v, int | float) for v in values):
        return statistics.median(values)
    return None


def compare(ours_runs: list[dict[str, Any]], vllm_runs: list[dict[str, Any]], tolerance: float,
            names: list[str] | None = None, judged: set[str] = JUDGED) -> list[dict[str, Any]]:
    """One row per figure: each side's median over its runs (and every run's value, and the spread
    (max - min) / median), ours / vLLM's, and for the judged figures whether that is within (the
    others are shown, not judged)."""
    rows = []
    for name in names if names is not None else [n for n, _, _ in COUNTS + FIGURES]:
        a_all, b_all = [r.get(name) for r in ours_runs], [r.get(name) for r in vllm_runs]
        a, b = _median(a_all), _median(b_all)
        row: dict[str, Any] = {"figure": name, "ours": a, "vllm": b, "ratio": None, "within": None}
        if len(ours_runs) > 1 or len(vllm_runs) > 1:
            row["ours_runs"], row["vllm_runs"] = a_all, b_all
            row["ours_spread"], row["vllm_spread"] = _spread(a_all), _spread(b_all)
        if isinstance(a, int | float) and isinstance(b, int | float) and b:
            row["ratio"] = a / b
            if name in judged:
                row["within"] = abs(a / b - 1) <= tolerance
        rows.append(row)
    return rows


def _spread(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, int | float)]
    if len(nums) < 2 or len(nums) != len(values) or not statistics.median(nums):
        return None
    return (max(nums) - min(nums)) / statistics.median(nums)


# --- vLLM's per-request records through our arithmetic --------------------------------------------

def vllm_records(doc: dict[str, Any]) -> list[RequestRecord]:
    """vLLM's `--save-detailed` lists as our records: token times rebuilt from start, TTFT and ITLs
    (vLLM's own E2E is TTFT plus its ITLs); a request failed if it has an error or no first token."""
    need = ("start_times", "ttfts", "itls", "output_lens", "input_lens", "errors")
    missing = [k for k in need if not isinstance(doc.get(k), list)]
    if missing:
        raise ValueError(f"no per-request records in the vLLM result (run it with --save-detailed): {missing}")
    records = []
    for i, (start, ttft, itls, out, inp, err) in enumerate(zip(*(doc[k] for k in need), strict=True)):
        record = RequestRecord(index=i, due_s=start, start_s=start, prompt_tokens=inp or 0)
        if err or not ttft:
            record.error_kind, record.error_message = "vllm_error", str(err)[:300] or "no first token"
        else:
            t = start + ttft
            record.token_times_s = [t]
            for gap in itls:
                t += gap
                record.token_times_s.append(t)
            record.output_tokens, record.output_tokens_source = int(out), "usage"
        records.append(record)
    return records


def our_records(run: dict[str, Any]) -> list[RequestRecord]:
    """Our run's per-request rows and chunk gaps (`--save-itls`) as records, each sent at 0: its
    TTFT, then one token time per gap."""
    table, gaps = run.get("requests"), run.get("itls_ms")
    if not isinstance(table, dict) or not isinstance(gaps, list) or len(gaps) != len(table.get("rows", [])):
        raise ValueError("no per-request records in our result (run it with --save-itls)")
    col = {name: i for i, name in enumerate(table["columns"])}
    records = []
    for i, (row, itls) in enumerate(zip(table["rows"], gaps, strict=True)):
        record = RequestRecord(index=i, due_s=0.0, prompt_tokens=row[col["prompt_tokens"]] or 0)
        if row[col["error_kind"]] is not None or row[col["ttft_ms"]] is None:
            record.error_kind = row[col["error_kind"]] or "no first token"
        else:
            t = row[col["ttft_ms"]] / 1e3
            record.token_times_s = [t]
            for gap in itls:
                t += gap / 1e3
                record.token_times_s.append(t)
            record.output_tokens, record.output_tokens_source = row[col["output_tokens"]], "usage"
        records.append(record)
    return records


def slot_turnaround_ms(sent_s: list[float], last_token_s: list[float], concurrency: int) -> list[float]:
    """Under a concurrency limit, how long each freed slot stayed empty: the k-th request sent after
    the first `concurrency` took the slot of the k-th answer to end (slots go first come, first
    served), so its send minus that answer's last token. The client's own turnaround (reading the
    stream's end, releasing the slot, building and sending the next request), plus the usage chunk
    and `[DONE]` after the last token. Seconds in, ms out."""
    sent, ended = sorted(sent_s), sorted(last_token_s)
    return [(sent[concurrency + k] - ended[k]) * 1e3 for k in range(len(sent) - concurrency)]


def _turnarounds(client: str, doc: dict[str, Any]) -> list[float] | None:
    """One run's slot turnarounds (None: no concurrency limit, or no per-request send times)."""
    if client == "ours":
        run = our_run(doc, 0)
        limit, table = (run.get("load") or {}).get("concurrency"), run.get("requests") or {}
        col = {name: i for i, name in enumerate(table.get("columns", []))}
        if not limit or "sent_ms" not in col or "clock_origin_s" not in run:
            return None
        ok = [r for r in table["rows"] if r[col["error_kind"]] is None and r[col["sent_ms"]] is not None]
        sent = [run["clock_origin_s"] + r[col["sent_ms"]] / 1e3 for r in ok]
        ended = [s + r[col["e2e_ms"]] / 1e3 for s, r in zip(sent, ok, strict=True)]
    else:
        limit = doc.get("max_concurrency")
        if not limit or not isinstance(doc.get("start_times"), list):
            return None
        recs = [r for r in vllm_records(doc) if r.ok]
        sent, ended = [r.start_s for r in recs], [r.token_times_s[-1] for r in recs]
    return slot_turnaround_ms(sent, ended, int(limit)) if len(sent) > limit else None


def pooled_figures(runs: list[tuple[list[RequestRecord], float]]) -> dict[str, Any]:
    """One client's rounds as one sample: every request of every round, over the rounds' summed
    duration, through our arithmetic (a p99 of 16 requests per round is one or two requests; pooled,
    it is a percentile of all of them)."""
    records = [r for recs, _ in runs for r in recs]
    return our_figures(metrics.summarize(records, sum(d for _, d in runs), percentiles=(50.0, 90.0, 99.0)))


def arithmetic_check(doc: dict[str, Any]) -> dict[str, Any]:
    """vLLM's reported figures against ours computed from vLLM's own records."""
    summary = metrics.summarize(vllm_records(doc), float(doc["duration"]), percentiles=(50.0, 90.0, 99.0))
    pairs: dict[str, tuple[Any, Any]] = {
        k: (summary[k], doc.get(k)) for k in ("completed", "total_input_tokens", "total_output_tokens",
                                              "request_throughput", "output_throughput", "total_token_throughput")}
    for m in ("ttft", "tpot", "itl", "e2el"):
        ours = summary["latency_ms"][m]
        for stat, key in (("mean", "mean"), ("p50", "median"), ("std", "std"), ("p90", "p90"), ("p99", "p99")):
            if f"{key}_{m}_ms" in doc:
                pairs[f"{key}_{m}_ms"] = (ours[stat], doc[f"{key}_{m}_ms"])
    worst, worst_key = 0.0, None
    for key, (a, b) in pairs.items():
        if not isinstance(a, int | float) or not isinstance(b, int | float):
            worst, worst_key = float("inf"), key
            break
        # NOTE: below IDENTITY_ABS (a nanosecond, in ms) a difference is rounding even where the figure
        # itself is about zero (the std of equal gaps), where a relative one means nothing.
        rel = 0.0 if abs(a - b) <= IDENTITY_ABS else abs(a - b) / max(abs(b), 1e-300)
        if rel > worst:
            worst, worst_key = rel, key
    return {"figures": len(pairs), "max_rel_diff": worst, "worst": worst_key, "ok": worst <= IDENTITY_REL}


# --- the server's own view of a run ------------------------------------------------------------

SERVER_COUNTERS = {"prompt_tokens": "vllm:prompt_tokens", "generation_tokens": "vllm:generation_tokens",
                   "requests_finished": "vllm:request_success", "prefix_cache_hits": "vllm:prefix_cache_hits",
                   "preemptions": "vllm:num_preemptions"}
SERVER_MEANS = {"mean_ttft_ms": "vllm:time_to_first_token_seconds",
                "mean_itl_ms": "vllm:inter_token_latency_seconds",
                "mean_e2e_ms": "vllm:e2e_request_latency_seconds"}


def _histogram_totals(text: str) -> dict[str, tuple[float, float]]:
    """{histogram: (sum, count)} summed over label sets."""
    out: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        total, count = 0.0, 0.0
        for s in family.samples:
            if s.name.endswith("_sum"):
                total += s.value
            elif s.name.endswith("_count"):
                count += s.value
        out[family.name] = (total, count)
    return out


def server_view(before: str, after: str) -> dict[str, Any]:
    """What one run cost the server (counter increases) and its mean latencies over that run."""
    a, b = parse_prometheus(before), parse_prometheus(after)
    out: dict[str, Any] = {k: (b[n] - a[n] if n in a and n in b else None) for k, n in SERVER_COUNTERS.items()}
    ha, hb = _histogram_totals(before), _histogram_totals(after)
    for key, name in SERVER_MEANS.items():
        if name in ha and name in hb and hb[name][1] > ha[name][1]:
            out[key] = (hb[name][0] - ha[name][0]) / (hb[name][1] - ha[name][1]) * 1e3
        else:
            out[key] = None
    return out


# --- the cross-check directory -----------------------------------------------------------------

def crosscheck(directory: Path, tolerance: float) -> dict[str, Any]:
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    with open(directory / "runs.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    workloads: dict[str, Any] = {}
    for w in dict.fromkeys(r["workload"] for r in rows):
        runs, sides = [], {"ours": [], "vllm": []}
        records: dict[str, list[tuple[list[RequestRecord], float]] | None] = {"ours": [], "vllm": []}
        turnaround: dict[str, list[float]] = {"ours": [], "vllm": []}
        for r in (r for r in rows if r["workload"] == w):
            name = f"{w}_{r['client']}_r{r['round']}"
            entry: dict[str, Any] = {"client": r["client"], "round": int(r["round"]), "seed": int(r["seed"]),
                                     "start_s": _seconds(r["start_ms"]), "end_s": _seconds(r["end_ms"]),
                                     "status": r["status"], "file": f"{name}.json"}
            runs.append(entry)
            path = directory / f"{name}.json"
            if r["status"] != "0" or not path.is_file():
                entry["error"] = "skipped" if r["status"] == "skipped" else f"exit {r['status']}, no result"
                continue
            doc = json.loads(path.read_text())
            if r["client"] == "ours":
                run = our_run(doc, 0)
                entry["figures"] = our_figures(run)
            else:
                entry["figures"] = vllm_figures(doc)
                try:
                    entry["arithmetic"] = arithmetic_check(doc)
                except (ValueError, KeyError) as exc:
                    entry["arithmetic"] = {"ok": None, "error": str(exc)}
            try:
                turnaround[r["client"]] += _turnarounds(r["client"], doc) or []
            except (ValueError, KeyError, TypeError):
                pass  # shown where both clients have them; nothing is judged on it
            pool = records[r["client"]]
            if pool is not None:
                try:
                    recs = our_records(run) if r["client"] == "ours" else vllm_records(doc)
                    pool.append((recs, float(entry["figures"]["duration (s)"])))
                except (ValueError, KeyError, TypeError):
                    records[r["client"]] = None  # a round without records: no pooled figures
            before, after = directory / f"{name}.before.prom", directory / f"{name}.after.prom"
            if before.is_file() and after.is_file():
                entry["server"] = server_view(before.read_text(), after.read_text())
            sides[r["client"]].append(entry["figures"])
        table = compare(sides["ours"], sides["vllm"], tolerance)
        pooled = None
        if records["ours"] and records["vllm"]:
            pooled = compare([pooled_figures(records["ours"])], [pooled_figures(records["vllm"])], tolerance)
        judged_table = pooled if pooled is not None else table
        # The server's own figures for the runs of each client: a difference here is the server's.
        served = {c: [r["server"] for r in runs if r["client"] == c and "server" in r and "figures" in r]
                  for c in ("ours", "vllm")}
        server_table = compare(served["ours"], served["vllm"], tolerance, [*SERVER_MEANS, *SERVER_COUNTERS], set())
        judged = [t for t in judged_table if t["within"] is not None]
        off = [t["figure"] for t in judged if not t["within"]]
        off_medians = [t["figure"] for t in table if t["within"] is False]
        workloads[w] = {"runs": runs, "figures": table, "pooled_figures": pooled,
                        "judged_on": "pooled" if pooled is not None else "medians of the rounds",
                        "medians_off": off_medians, "server_figures": server_table,
                        "server_work_identical": _same_server_work(runs),
                        "client_minus_server_mean_ttft_ms": _client_overhead(runs),
                        "slot_turnaround_ms": {c: _stats(turnaround[c]) for c in ("ours", "vllm")},
                        "arithmetic_identical": _all_ok(runs),
                        "verdict": ("no runs to compare" if not judged or not sides["ours"] or not sides["vllm"]
                                    else f"{len(judged) - len(off)}/{len(judged)} figures within {tolerance:.0%}"
                                    + (f"; off: {', '.join(off)}" if off else "")),
                        "agree": bool(judged) and bool(sides["ours"]) and bool(sides["vllm"]) and not off}
    return {"what": "llm-appliance bench serve against vllm bench serve: one server, the same workloads, "
                    "the clients alternated; per figure the median over each client's rounds, and the "
                    "figures of each client's rounds pooled (every request of every round, one sample; "
                    "the verdict is on these when both clients left per-request records); workloads "
                    "named <w>s: both clients at once, each with half the prompts and half the concurrency",
            **meta, "tolerance": tolerance, "workloads": workloads,
            "agree": bool(workloads) and all(v["agree"] for v in workloads.values())}


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "mean": statistics.fmean(values), "p50": metrics.percentile(values, 50),
            "p99": metrics.percentile(values, 99)}


def _seconds(ms: str) -> float | None:
    return int(ms) / 1e3 if ms.strip().lstrip("-").isdigit() else None


def _same_server_work(runs: list[dict[str, Any]]) -> bool | None:
    """Every run cost the server the same prompt and generated tokens (None: not known)."""
    seen = {(s["prompt_tokens"], s["generation_tokens"]) for r in runs if (s := r.get("server"))
            and s["prompt_tokens"] is not None and s["generation_tokens"] is not None}
    return None if not seen else len(seen) == 1


def _client_overhead(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Median over each client's runs of its mean TTFT minus the server's for the same requests:
    what the client (HTTP, its loop) adds, apart from how fast the server was in that run."""
    out: dict[str, float | None] = {}
    for client in ("ours", "vllm"):
        diffs = [r["figures"]["mean TTFT (ms)"] - r["server"]["mean_ttft_ms"] for r in runs
                 if r["client"] == client and r.get("figures") and r.get("server")
                 and isinstance(r["figures"].get("mean TTFT (ms)"), int | float)
                 and isinstance(r["server"].get("mean_ttft_ms"), int | float)]
        out[client] = statistics.median(diffs) if diffs else None
    return out


def _all_ok(runs: list[dict[str, Any]]) -> bool | None:
    checks = [r["arithmetic"]["ok"] for r in runs if "arithmetic" in r]
    return None if not checks or None in checks else all(checks)


# --- printing --------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict[str, Any]], tolerance: float) -> None:
    print(f"{'figure':<28} {'ours':>12} {'vLLM':>12} {'ours/vLLM':>10}")
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        flag = "" if row["within"] is None else ("  ok" if row["within"] else f"  OFF by more than {tolerance:.0%}")
        spread = ""
        if row.get("ours_spread") is not None and row.get("vllm_spread") is not None:
            spread = f"  (spread {row['ours_spread']:.1%} / {row['vllm_spread']:.1%})"
        print(f"{row['figure']:<28} {_fmt(row['ours']):>12} {_fmt(row['vllm']):>12} {ratio:>10}{flag}{spread}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("pair", type=Path, nargs="*", help="OURS.json VLLM.json")
    parser.add_argument("--ours", type=Path, nargs="+", default=[], help="our result file(s)")
    parser.add_argument("--vllm", type=Path, nargs="+", default=[], help="vLLM's result file(s)")
    parser.add_argument("--crosscheck", type=Path, help="a crosscheck_bench_serve.sh output directory")
    parser.add_argument("--run", type=int, default=0, help="which of our load points (default: the first)")
    parser.add_argument("--tolerance", type=float, default=0.03, help="relative (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    args = parser.parse_args(argv)
    if args.crosscheck:
        if args.pair or args.ours or args.vllm:
            parser.error("--crosscheck reads its directory: no result files besides")
        doc = crosscheck(args.crosscheck, args.tolerance)
        for name, w in doc["workloads"].items():
            print(f"== {name}: {w['verdict']}; server work identical: {w['server_work_identical']}; "
                  f"vLLM's figures from its records by our arithmetic: {w['arithmetic_identical']}; "
                  f"client - server mean TTFT (ms): {w['client_minus_server_mean_ttft_ms']}; "
                  f"slot turnaround (ms): {w['slot_turnaround_ms']}")
            if w["pooled_figures"] is not None:
                print("-- pooled over the rounds (judged):")
                print_table(w["pooled_figures"], args.tolerance)
                print("-- medians of the rounds (shown; off: " + (", ".join(w["medians_off"]) or "none") + "):")
            print_table(w["figures"], args.tolerance)
            print("-- the server's own view of the same runs (its /metrics):")
            print_table(w["server_figures"], args.tolerance)
        if args.json:
            args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print("agree" if doc["agree"] else "do not agree", f"within {args.tolerance:.0%}")
        return 0 if doc["agree"] else 1
    if args.pair:
        if len(args.pair) != 2 or args.ours or args.vllm:
            parser.error("give OURS.json VLLM.json, or --ours FILE... --vllm FILE...")
        args.ours, args.vllm = [args.pair[0]], [args.pair[1]]
    if not args.ours or not args.vllm:
        parser.error("need our result(s) and vLLM's")
    our_runs = [our_run(json.loads(p.read_text()), args.run) for p in args.ours]
    rows = compare([our_figures(r) for r in our_runs],
                   [vllm_figures(json.loads(p.read_text())) for p in args.vllm], args.tolerance)
    print(f"ours: {', '.join(map(str, args.ours))} (run {args.run}, load {our_runs[0].get('load')})\n"
          f"vLLM: {', '.join(map(str, args.vllm))}" + ("\n(medians over the files)" if
                                                      len(args.ours) > 1 or len(args.vllm) > 1 else ""))
    print_table(rows, args.tolerance)
    compared = [r for r in rows if r["within"] is not None]
    if args.json:
        args.json.write_text(json.dumps({"ours": [str(p) for p in args.ours], "vllm": [str(p) for p in args.vllm],
                                         "run": args.run, "tolerance": args.tolerance, "rows": rows}, indent=1) + "\n")
    if not compared:
        print("nothing to compare")
        return 1
    bad = [r["figure"] for r in compared if not r["within"]]
    print(f"{len(compared) - len(bad)}/{len(compared)} figures within {args.tolerance:.0%}"
          + (f"; off: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
