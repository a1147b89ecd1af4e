"""bench/compare_bench_serve.py: our result against a vLLM result file (vLLM's key names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from appliance_bench.compare_bench_serve import main

from appliance.benchserve import metrics
from appliance.benchserve.record import RequestRecord


def _ours(tmp_path: Path) -> Path:
    records = [RequestRecord(index=i, due_s=0.0, start_s=0.0, token_times_s=[0.1 * (i + 1), 0.1 * (i + 1) + 0.05],
                             output_tokens=2, output_tokens_source="usage", prompt_tokens=8) for i in range(4)]
    run = metrics.summarize(records, duration_s=1.0)
    path = tmp_path / "ours.json"
    path.write_text(json.dumps({"runs": [run]}))
    return path


def _vllm(tmp_path: Path, scale: float) -> Path:
    # vLLM's names: p50 is `median_*`, p99 `p99_*`; TTFTs 100..400 ms -> median 250, p99 397.
    doc = {"completed": 4, "failed": 0, "total_input_tokens": 32, "total_output_tokens": 8,
           "request_throughput": 4.0 * scale, "output_throughput": 8.0, "total_token_throughput": 40.0,
           "median_ttft_ms": 250.0, "p99_ttft_ms": 397.0, "median_tpot_ms": 50.0, "p99_tpot_ms": 50.0,
           "median_itl_ms": 50.0, "p99_itl_ms": 50.0}
    path = tmp_path / "vllm.json"
    path.write_text(json.dumps(doc))
    return path


def test_ratios_within_and_outside_the_tolerance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ours = _ours(tmp_path)
    out_json = tmp_path / "cmp.json"
    assert main([str(ours), str(_vllm(tmp_path, 1.0)), "--json", str(out_json)]) == 0
    assert "9/9 figures within 3%" in capsys.readouterr().out
    rows = {r["figure"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert rows["p99 TTFT (ms)"]["ratio"] == pytest.approx(1.0)
    assert rows["completed"]["ours"] == 4 and rows["completed"]["ratio"] == 1.0
    assert rows["completed"]["within"] is None  # shown, not judged
    # vLLM 5% faster in request throughput: that figure is off, the exit status says so.
    assert main([str(ours), str(_vllm(tmp_path, 1.05))]) == 1
    out = capsys.readouterr().out
    assert "8/9 figures within 3%; off: request throughput (req/s)" in out
    with pytest.raises(ValueError, match="1 run"):
        main([str(ours), str(_vllm(tmp_path, 1.0)), "--run", "3"])


def test_medians_over_repeats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ours = _ours(tmp_path)
    runs = []
    for i, scale in enumerate((0.5, 1.0, 1.01)):  # median 1.0: one bad repeat does not decide it
        (tmp_path / f"v{i}").mkdir()
        runs.append(str(_vllm(tmp_path / f"v{i}", scale)))
    assert main(["--ours", str(ours), str(ours), "--vllm", *runs]) == 0
    assert "(medians over the files)" in capsys.readouterr().out


def _prom(prompt: int, generated: int, finished: int, ttft_sum_s: float) -> str:
    """The counters and one histogram of the server's /metrics that the cross-check reads."""
    return "\n".join([
        "# TYPE vllm:prompt_tokens counter", f'vllm:prompt_tokens_total{{model_name="m"}} {prompt}',
        "# TYPE vllm:generation_tokens counter", f'vllm:generation_tokens_total{{model_name="m"}} {generated}',
        "# TYPE vllm:request_success counter",
        f'vllm:request_success_total{{finished_reason="length",model_name="m"}} {finished}',
        "# TYPE vllm:time_to_first_token_seconds histogram",
        f'vllm:time_to_first_token_seconds_bucket{{le="+Inf",model_name="m"}} {finished}',
        f'vllm:time_to_first_token_seconds_count{{model_name="m"}} {finished}',
        f'vllm:time_to_first_token_seconds_sum{{model_name="m"}} {ttft_sum_s}', ""])


def _crosscheck_dir(path: Path, ours_scale: tuple[float, float], vllm_scale: tuple[float, float],
                    records: bool = True) -> Path:
    """What crosscheck_bench_serve.sh leaves: runs alternated ours, vLLM, vLLM, ours; every run the
    same requests, its clock stretched by its scale (a slower or faster server that run). records:
    our runs keep their per-request rows and gaps (`--save-itls`, as the script runs it)."""
    import random

    from appliance_bench.compare_bench_serve import vllm_records
    from vllm_reference import Stream, done, token, usage, vllm_result_doc

    rng = random.Random(3)
    base = []
    for i in range(64):
        start = 0.01 * i
        t = start + rng.uniform(0.02, 0.3)
        events = [token(t + 0.01 * k, "w") for k in range(20)]
        base.append(Stream(start, [*events, usage(t + 0.2, 512, 20), done(t + 0.2)], prompt_len=512))
    path.mkdir()
    rows = ["workload\tclient\tround\tseed\tstart_ms\tend_ms\tstatus"]
    order = [("ours", 1, ours_scale[0]), ("vllm", 1, vllm_scale[0]), ("vllm", 2, vllm_scale[1]),
             ("ours", 2, ours_scale[1])]
    done_before = 0
    for n, (client, rnd, scale) in enumerate(order):
        streams = [Stream(s.start * scale, [(t * scale, p) for t, p in s.events], s.prompt_len) for s in base]
        doc = vllm_result_doc(streams, 1.0 * scale, [50.0, 90.0, 99.0])
        if client == "ours":
            recs = vllm_records(doc)
            run = metrics.summarize(recs, 1.0 * scale)
            if records:
                from appliance.benchserve.runner import REQUEST_COLUMNS, _row
                run["requests"] = {"columns": list(REQUEST_COLUMNS), "rows": [_row(r, 0.0) for r in recs]}
                run["clock_origin_s"] = 0.0
                run["itls_ms"] = [[gap * 1e3 for gap in r.itls_s] for r in recs]
            doc = {"runs": [run]}
        name = f"w1c64_{client}_r{rnd}"
        (path / f"{name}.json").write_text(json.dumps(doc))
        ttft_sum = sum(s.events[0][0] - s.start for s in streams) - 0.001 * len(streams)  # server: 1 ms less
        (path / f"{name}.before.prom").write_text(_prom(512 * done_before, 20 * done_before, done_before, 0.0))
        done_before += len(base)
        (path / f"{name}.after.prom").write_text(_prom(512 * done_before, 20 * done_before, done_before, ttft_sum))
        rows.append(f"w1c64\t{client}\t{rnd}\t{100 * rnd + 1}\t{1000 * n}\t{1000 * n + 900}\t0")
    rows.append("w1c64\tours\t3\t301\t4000\t\tskipped")
    (path / "runs.tsv").write_text("\n".join(rows) + "\n")
    (path / "meta.json").write_text(json.dumps({"label": "t", "vllm_version": "0.26.0"}))
    return path


def test_crosscheck_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Ours' rounds 1.00x and 1.02x the clock (median 1.01x), vLLM's 1.01x and 0.99x (median 1.00x):
    # latencies 1% higher, throughputs 1% lower, within 3%.
    d = _crosscheck_dir(tmp_path / "ok", (1.00, 1.02), (1.01, 0.99))
    assert main(["--crosscheck", str(d), "--json", str(d / "x.json")]) == 0
    doc = json.loads((d / "x.json").read_text())
    assert doc["agree"] and doc["vllm_version"] == "0.26.0"
    w = doc["workloads"]["w1c64"]
    rows = {r["figure"]: r for r in w["figures"]}
    assert rows["p50 TTFT (ms)"]["ratio"] == pytest.approx(1.01)
    # (medians of two are means; of throughputs, means of the reciprocal clocks)
    assert rows["request throughput (req/s)"]["ratio"] == pytest.approx((1 + 1 / 1.02) / (1 / 1.01 + 1 / 0.99))
    assert rows["p99 ITL (ms)"]["ours_spread"] == pytest.approx(0.02 / 1.01)
    assert rows["completed"]["ours"] == 64 and rows["completed"]["within"] is None
    assert w["server_work_identical"] is True and w["arithmetic_identical"] is True
    server = {r["figure"]: r for r in w["server_figures"]}
    assert server["prompt_tokens"]["ours"] == server["prompt_tokens"]["vllm"] == 64 * 512
    assert server["mean_ttft_ms"]["within"] is None  # shown, not judged
    assert server["mean_ttft_ms"]["ours"] == pytest.approx(rows["mean TTFT (ms)"]["ours"] - 1.0)
    assert w["client_minus_server_mean_ttft_ms"]["ours"] == pytest.approx(1.0)
    assert w["client_minus_server_mean_ttft_ms"]["vllm"] == pytest.approx(1.0)
    assert [r["status"] for r in w["runs"]] == ["0", "0", "0", "0", "skipped"]
    assert w["runs"][1]["server"]["prompt_tokens"] == 64 * 512
    assert "9/9 figures within 3%" in capsys.readouterr().out
    # Judged on the rounds pooled: each client's 128 requests as one sample, our records rebuilt
    # from our rows and gaps (vLLM's from its --save-detailed lists).
    assert w["judged_on"] == "pooled" and w["medians_off"] == []
    pooled = {r["figure"]: r for r in w["pooled_figures"]}
    assert pooled["completed"]["ours"] == pooled["completed"]["vllm"] == 128
    assert pooled["output throughput (tok/s)"]["ratio"] == pytest.approx((1.01 + 0.99) / (1.00 + 1.02))
    assert all(abs(r["ratio"] - 1) < 0.03 for r in w["pooled_figures"] if r["within"] is not None)
    # Without our per-request records the verdict falls back to the medians of the rounds.
    d = _crosscheck_dir(tmp_path / "medians", (1.00, 1.02), (1.01, 0.99), records=False)
    assert main(["--crosscheck", str(d), "--json", str(d / "x.json")]) == 0
    w = json.loads((d / "x.json").read_text())["workloads"]["w1c64"]
    assert w["judged_on"] == "medians of the rounds" and w["pooled_figures"] is None
    # vLLM's rounds 6% and 8% slower: every figure off by about 7%.
    d = _crosscheck_dir(tmp_path / "off", (1.00, 1.00), (1.06, 1.08))
    assert main(["--crosscheck", str(d), "--json", str(d / "x.json")]) == 1
    doc = json.loads((d / "x.json").read_text())
    assert not doc["agree"] and "0/9 figures within 3%" in doc["workloads"]["w1c64"]["verdict"]


def test_the_vllm_client_loop(tmp_path: Path) -> None:
    """bench/vllm_bench_client.py's protocol, with a stand-in for vLLM's CLI (vLLM itself does not
    import on the CI's Python): `ready VERSION` once imported, then `done STATUS` per run line,
    each run's output in its log, nothing but answers on stdout."""
    import subprocess
    import sys

    site = tmp_path / "site"
    cli = site / "vllm" / "entrypoints" / "cli"
    cli.mkdir(parents=True)
    for d in (site / "vllm", site / "vllm" / "entrypoints", cli):
        (d / "__init__.py").write_text("")
    (cli / "main.py").write_text(
        "import sys\n"
        "print('imported')\n"
        "def main():\n"
        "    print('args', sys.argv[1:])\n"
        "    if sys.argv[3] == '--help':\n"
        "        raise SystemExit(0)\n"
        "    if sys.argv[3] == 'exit':\n"
        "        raise SystemExit(int(sys.argv[4]))\n"
        "    if sys.argv[3] == 'boom':\n"
        "        raise RuntimeError('boom')\n")
    (site / "vllm-9.9.9.dist-info").mkdir()
    (site / "vllm-9.9.9.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 9.9.9\n")
    script = Path(__file__).resolve().parents[2] / "bench" / "vllm_bench_client.py"
    logs = [tmp_path / f"log{i}" for i in range(3)]
    lines = f"{logs[0]} --seed 1 '{{\"k\": 1}}'\n{logs[1]} exit 3\n{logs[2]} boom\nquit\n"
    out = subprocess.run([sys.executable, str(script)], input=lines, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["ready 9.9.9", "done 0", "done 3", "done 1"]
    assert "args ['bench', 'serve', '--seed', '1', '{\"k\": 1}']" in logs[0].read_text()
    assert "RuntimeError: boom" in logs[2].read_text()
    assert "imported" in out.stderr  # printed at import: kept off the answers (so is --help's output)


def test_slot_turnaround_pairs_each_freed_slot_with_the_next_send() -> None:
    """Concurrency 2: the first two sent at once; the third takes the slot of the first answer to end
    (last token at 1.0 s, sent at 1.05 s: 50 ms), the fourth that of the second (2.0 -> 2.1: 100 ms).
    Our rows (sent_ms from the run's clock origin, E2E) and vLLM's records (start times, TTFT, gaps)
    of the same requests give the same figures."""
    from appliance_bench.compare_bench_serve import _turnarounds, slot_turnaround_ms

    sent, last = [0.0, 0.0, 1.05, 2.1], [1.0, 2.0, 3.0, 4.0]
    assert slot_turnaround_ms(sent, last, 2) == pytest.approx([50.0, 100.0])
    assert slot_turnaround_ms(list(reversed(sent)), last, 2) == pytest.approx([50.0, 100.0])  # order-free
    assert slot_turnaround_ms(sent, last, 4) == []
    origin = 100.0
    from appliance.benchserve.runner import REQUEST_COLUMNS
    col = {c: i for i, c in enumerate(REQUEST_COLUMNS)}
    rows = []
    for s, e in zip(sent, last, strict=True):
        row: list = [None] * len(REQUEST_COLUMNS)
        row[col["sent_ms"]], row[col["e2e_ms"]], row[col["ttft_ms"]] = s * 1e3, (e - s) * 1e3, 100.0
        rows.append(row)
    ours = {"runs": [{"load": {"concurrency": 2}, "clock_origin_s": origin,
                      "requests": {"columns": list(REQUEST_COLUMNS), "rows": rows}}]}
    assert _turnarounds("ours", ours) == pytest.approx([50.0, 100.0])
    vllm = {"max_concurrency": 2, "start_times": [origin + s for s in sent], "ttfts": [0.1] * 4,
            "itls": [[e - s - 0.1] for s, e in zip(sent, last, strict=True)], "output_lens": [2] * 4,
            "input_lens": [8] * 4, "errors": [""] * 4}
    assert _turnarounds("vllm", vllm) == pytest.approx([50.0, 100.0])
    assert _turnarounds("vllm", {**vllm, "max_concurrency": None}) is None
    assert _turnarounds("ours", {"runs": [{**ours["runs"][0], "load": {"concurrency": None}}]}) is None
