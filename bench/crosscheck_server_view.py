"""Issue 14's cross-check, request by request: what each client measured against what our server
logged for the same request.

`bench/compare_bench_serve.py --crosscheck` compares the two clients' figures. Under load their
p99s differ by more than 3% even side by side (docs/bench-serve.md), and a figure alone cannot say
whether the clients measure differently or the server served their halves differently: each client
sends its own requests. Our daemon logs every request (`appliance.requests`: arrival time, TTFT and
total time as the server saw them), so each client request can be paired with the server's record
of it, and each figure split in two:

    client ratio (ours / vLLM)  =  service ratio (the server's figure for our half / for vLLM's)
                                 x  measurement ratio (the rest: what the clients add or miss)

The measurement ratio is the cross-check of the clients themselves; the service ratio is the
server's run-to-run spread, which no choice of client removes.

Pairing: both clients stamp sends with `time.perf_counter()` (our rows' `clock_origin_s` +
`sent_ms`, vLLM's `start_times`), one monotonic clock for every process of the host; the server log
stamps arrivals in wall-clock milliseconds. The offset between the clocks is the mode of
(arrival - send) over all pairs (every send has its arrival a fraction of a millisecond later;
other pairs spread evenly), then each send takes the nearest unused arrival with its prompt
length within a few milliseconds of that offset.

    python bench/crosscheck_server_view.py --crosscheck DIR [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from appliance_bench.compare_bench_serve import our_run, vllm_records

from appliance.benchserve import metrics

_LOG_LINE = re.compile(r"appliance\.requests: (\{.*\})\s*$")
_RUN_FILE = re.compile(r"^(?P<workload>[a-z0-9]+)_(?P<client>ours|vllm)_r(?P<round>\d+)\.json$")
BIN_S = 0.001  # the server log's resolution
MATCH_BEFORE_S, MATCH_AFTER_S = 0.003, 0.010  # around a run's offset: clock rounding, the request's transit
TTFT_SLACK_MS = 1.0  # the log's millisecond arrival stamp
END_TOLERANCE_S = 0.003  # the two views of a request's end agree this closely (the log's ms, the last chunk)
MIN_PAIRED = 0.95  # a workload's ratios are judged when each half paired at least this share
NEAR_S = 0.05  # a run's offset is searched this close to the session's


def server_requests(log_text: str) -> list[dict[str, Any]]:
    """Our daemon's request log lines: arrival (epoch seconds), prompt tokens, TTFT and total (ms)."""
    out = []
    for line in log_text.splitlines():
        m = _LOG_LINE.search(line)
        if not m:
            continue
        rec = json.loads(m.group(1))
        if rec.get("status") != 200 or rec.get("ttft_s") is None:
            continue
        arrival = dt.datetime.fromisoformat(rec["time"].replace("Z", "+00:00")).timestamp()
        out.append({"arrival_s": arrival, "prompt_tokens": rec.get("prompt_tokens"),
                    "ttft_ms": rec["ttft_s"] * 1e3, "total_ms": rec["total_s"] * 1e3,
                    "tpot_ms": _tpot(rec["ttft_s"] * 1e3, rec["total_s"] * 1e3, rec.get("completion_tokens"))})
    return out


def _tpot(ttft_ms: float, e2e_ms: float, output_tokens: int | None) -> float | None:
    """(E2E - TTFT) / (output tokens - 1), the definition both clients use; None under 2 tokens."""
    return (e2e_ms - ttft_ms) / (output_tokens - 1) if output_tokens and output_tokens > 1 else None


def client_requests(doc: dict[str, Any], client: str) -> list[dict[str, Any]]:
    """One run's successful requests: send (perf_counter seconds), prompt tokens, TTFT and E2E (ms)."""
    if client == "vllm":
        return [{"send_s": r.start_s, "prompt_tokens": r.prompt_tokens, "ttft_ms": r.ttft_s * 1e3,
                 "e2e_ms": r.e2e_s * 1e3, "tpot_ms": _tpot(r.ttft_s * 1e3, r.e2e_s * 1e3, r.output_tokens)}
                for r in vllm_records(doc) if r.ok]
    run = our_run(doc, 0)
    table = run.get("requests") or {}
    col = {name: i for i, name in enumerate(table.get("columns", []))}
    if "sent_ms" not in col or run.get("clock_origin_s") is None:
        raise ValueError("our result has no send times (rows need sent_ms and the run clock_origin_s)")
    origin = float(run["clock_origin_s"])
    return [{"send_s": origin + row[col["sent_ms"]] / 1e3, "prompt_tokens": row[col["prompt_tokens"]],
             "ttft_ms": row[col["ttft_ms"]], "e2e_ms": row[col["e2e_ms"]],
             "tpot_ms": _tpot(row[col["ttft_ms"]], row[col["e2e_ms"]], row[col["output_tokens"]])}
            for row in table.get("rows", [])
            if row[col["error_kind"]] is None and row[col["ttft_ms"]] is not None and row[col["sent_ms"]] is not None]


def clock_offset(sends: list[float], arrivals: list[float], near: float | None = None) -> float:
    """arrival - send for the same request: the most common difference over all pairs, in BIN_S bins
    (its bin's lower edge: arrivals are truncated to the millisecond); within NEAR_S of `near` when
    given (a run of few requests has few true pairs, and chance pairs elsewhere could outnumber them)."""
    if not sends or not arrivals:
        raise ValueError("no sends or no server records to pair")
    s = np.asarray(sends, dtype=np.float64)
    a = np.asarray(arrivals, dtype=np.float64)
    raw = (a[None, :] - s[:, None]).ravel()
    if near is not None:
        raw = raw[np.abs(raw - near) <= NEAR_S]
        if not len(raw):
            raise ValueError("no server record near the clock offset of the other runs")
    diffs = np.floor(raw / BIN_S).astype(np.int64)
    values, counts = np.unique(diffs, return_counts=True)
    # A request's transit spans the bin of its truncation and the next: take the best pair of bins.
    pair = counts[:-1] + np.where(np.diff(values) == 1, counts[1:], 0)
    best = int(np.argmax(pair)) if len(pair) else 0
    return float(values[best]) * BIN_S


def pair_requests(clients: list[dict[str, Any]], server: list[dict[str, Any]], offset: float) -> int:
    """Give each client request (sorted by send) the unused server record that fits it best (below);
    returns how many paired (the others: `server` None)."""
    arrivals = np.asarray([r["arrival_s"] for r in server], dtype=np.float64)
    order = np.argsort(arrivals)
    sorted_arrivals = arrivals[order]
    used = np.zeros(len(server), dtype=bool)
    paired = 0
    for req in sorted(clients, key=lambda r: r["send_s"]):
        expect = req["send_s"] + offset
        lo = np.searchsorted(sorted_arrivals, expect - MATCH_BEFORE_S, side="left")
        hi = np.searchsorted(sorted_arrivals, expect + MATCH_AFTER_S + BIN_S, side="right")
        # The records in the window that agree with the client's view: the same end (arrival +
        # total against send + E2E, within END_TOLERANCE_S) and a TTFT the client's covers (its
        # clock runs from before the server's starts); of those the nearest arrival. Under a closed
        # loop's bursts requests of one length arrive and end together and the handler's start
        # lags arrivals by tens of ms: a request none fits stays unpaired rather than take a
        # neighbour's ("ambiguous" counts those several fitted).
        end = expect + req["e2e_ms"] / 1e3
        fits = []
        for k in range(lo, hi):
            idx = int(order[k])
            rec = server[idx]
            if used[idx] or rec["prompt_tokens"] != req["prompt_tokens"]:
                continue
            if abs(arrivals[idx] + rec["total_ms"] / 1e3 - end) > END_TOLERANCE_S:
                continue
            if rec["ttft_ms"] > req["ttft_ms"] + TTFT_SLACK_MS:
                continue
            fits.append(idx)
        req["ambiguous"] = len(fits) > 1
        req["server"] = None
        if fits:
            best = min(fits, key=lambda i: abs(arrivals[i] - expect))
            req["server"] = server[best]
            used[best] = True
            paired += 1
    return paired


def _pcts(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "mean": float(np.mean(values)), "p50": metrics.percentile(values, 50),
            "p99": metrics.percentile(values, 99)}


def half_view(reqs: list[dict[str, Any]]) -> dict[str, Any]:
    """One client's paired requests: its figures, the server's for the same requests, the gaps."""
    ok = [r for r in reqs if r.get("server") is not None]
    view: dict[str, Any] = {"requests": len(reqs), "paired": len(ok),
                            "ambiguous": sum(1 for r in reqs if r.get("ambiguous"))}
    for name, client_key, server_key in (("ttft", "ttft_ms", "ttft_ms"), ("tpot", "tpot_ms", "tpot_ms"),
                                         ("e2e", "e2e_ms", "total_ms")):
        both = [r for r in ok if r[client_key] is not None and r["server"][server_key] is not None]
        view[name] = {"client": _pcts([r[client_key] for r in both]),
                      "server": _pcts([r["server"][server_key] for r in both]),
                      "client_minus_server": _pcts([r[client_key] - r["server"][server_key] for r in both])}
    return view


def split_ratios(ours: dict[str, Any], vllm: dict[str, Any]) -> dict[str, Any]:
    """client ratio = service ratio x measurement ratio, per figure and statistic."""
    out: dict[str, Any] = {}
    for name in ("ttft", "tpot", "e2e"):
        for stat in ("mean", "p50", "p99"):
            try:
                client = ours[name]["client"][stat] / vllm[name]["client"][stat]
                service = ours[name]["server"][stat] / vllm[name]["server"][stat]
            except (TypeError, ZeroDivisionError):
                continue
            out[f"{stat} {name}"] = {"client": client, "service": service, "measurement": client / service}
    return out


def server_view(directory: Path) -> dict[str, Any]:
    logs = sorted(directory.glob("serve_*.log"))
    if not logs:
        raise ValueError(f"{directory}: no serve_*.log (our daemon's request log) to pair with")
    server = [r for log in logs for r in server_requests(log.read_text(errors="replace"))]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in sorted(directory.glob("*_r*.json")):
        m = _RUN_FILE.match(path.name)
        if not m:
            continue
        reqs = client_requests(json.loads(path.read_text()), m["client"])
        for r in reqs:
            r["round"] = int(m["round"])
        runs.setdefault(m["workload"], {}).setdefault(m["client"], []).extend(reqs)
    every = [r for w in runs.values() for reqs in w.values() for r in reqs]
    arrivals = [r["arrival_s"] for r in server]
    offset = clock_offset([r["send_s"] for r in every], arrivals)
    # Then each run's own: a loaded server's handler starts a few ms after the request arrives
    # (its event loop is busy), so the session's mode is the heaviest run's, not the lightest's.
    paired, offsets = 0, {}
    for workload, halves in runs.items():
        for client, reqs in halves.items():
            for rnd in sorted({r["round"] for r in reqs}):
                part = [r for r in reqs if r["round"] == rnd]
                run_offset = clock_offset([r["send_s"] for r in part], arrivals, near=offset)
                offsets[f"{workload}_{client}_r{rnd}"] = run_offset - offset
                paired += pair_requests(part, server, run_offset)
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    result: dict[str, Any] = {"meta": meta, "server_records": len(server), "client_requests": len(every), "paired": paired,
                              "clock_offset_s": offset, "run_offsets_ms": {k: v * 1e3 for k, v in offsets.items()},
                              "workloads": {}}
    for workload, halves in runs.items():
        views = {client: half_view(reqs) for client, reqs in halves.items()}
        entry: dict[str, Any] = {"halves": views}
        if "ours" in views and "vllm" in views:
            entry["ratios"] = split_ratios(views["ours"], views["vllm"])
            # Judged only when (nearly) every request found its record: a subsample picked by the
            # pairing (under load: the requests that did not arrive in a burst) is not the half.
            entry["complete"] = all(v["paired"] >= MIN_PAIRED * v["requests"] for v in views.values())
        result["workloads"][workload] = entry
    return result


def print_view(result: dict[str, Any], tolerance: float) -> None:
    print(f"paired {result['paired']} of {result['client_requests']} client requests with the server's "
          f"{result['server_records']} records (clock offset {result['clock_offset_s']:.3f} s)")
    for workload, entry in result["workloads"].items():
        print(f"== {workload}")
        for client, view in entry["halves"].items():
            t = view["ttft"]
            print(f"  {client:5} paired {view['paired']}/{view['requests']}: TTFT client p50/p99 "
                  f"{t['client']['p50']:.2f}/{t['client']['p99']:.2f} ms, server {t['server']['p50']:.2f}/"
                  f"{t['server']['p99']:.2f}, client - server p50/p99 {t['client_minus_server']['p50']:.2f}/"
                  f"{t['client_minus_server']['p99']:.2f}" if view["paired"] else
                  f"  {client:5} paired 0/{view['requests']}")
        if "ratios" in entry and not entry["complete"]:
            print(f"  (not judged: under {MIN_PAIRED:.0%} of a half paired; the server's stamps lag its "
                  "arrivals and ends under this load)")
        for figure, r in entry.get("ratios", {}).items():
            verdict = ("ok" if abs(r["measurement"] - 1) <= tolerance else "OFF") if entry["complete"] else "-"
            print(f"  {figure:10} ours/vLLM: client {r['client']:.3f} = service {r['service']:.3f} "
                  f"x measurement {r['measurement']:.3f}  {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crosscheck", type=Path, required=True, help="a crosscheck_bench_serve.sh output folder")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--tolerance", type=float, default=0.03)
    args = parser.parse_args(argv)
    try:
        result = server_view(args.crosscheck)
    except (OSError, ValueError) as exc:
        print(f"crosscheck_server_view: {exc}", file=sys.stderr)
        return 2
    result["tolerance"] = args.tolerance
    print_view(result, args.tolerance)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
