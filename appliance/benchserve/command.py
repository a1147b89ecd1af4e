"""`llm-appliance bench serve`: the command line of the serving benchmark.

    llm-appliance bench serve --base-url http://127.0.0.1:8000 --model m --tokenizer DIR \\
        --input-len 512 --output-len 256 --ignore-eos --num-prompts 512 --rates 1,4,16,inf
    llm-appliance bench serve ... --capacity --slo p99-ttft:500,p99-itl:50

Sweeps (`--rates`, `--concurrency`; both given: every pair) run in one go, each load point with
its own prompts (stream "point N" of the seed) and arrivals (seed + N), after one warm-up request.
The JSON result and the PNG plots go to --result-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp

from appliance.benchserve import capacity, metrics, report, workload
from appliance.benchserve.arrivals import parse_rate
from appliance.benchserve.client import ENDPOINTS, ClientConfig, send
from appliance.benchserve.runner import LoadPoint, RunOptions, new_session, run_point


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("server")
    target.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 (no /v1)")
    target.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    target.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer key (default: $OPENAI_API_KEY)")
    target.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="completions",
                        help="streamed /v1/completions or /v1/chat/completions (default: %(default)s)")
    target.add_argument("--ignore-eos", action="store_true",
                        help="send ignore_eos (vLLM, ours, llama.cpp) so answers run to max_tokens")
    target.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    target.add_argument("--extra-body", type=json.loads, help="JSON object merged into every request body")
    target.add_argument("--request-timeout", type=float, default=6 * 3600.0,
                        help="seconds one request may take before it counts as a timeout (default: 6 h)")

    wl = parser.add_argument_group("workload")
    wl.add_argument("--workload", choices=workload.WORKLOADS, default="random")
    wl.add_argument("--tokenizer", help="tokenizer dir or name for building prompts (default: --model)")
    wl.add_argument("--input-len", default="512", help="prompt tokens: N or LOW:HIGH (default: %(default)s)")
    wl.add_argument("--output-len", help="max_tokens: N or LOW:HIGH (default: 256; chat: from the file)")
    wl.add_argument("--prefix-len", type=int, default=0, help="shared-prefix: tokens of the shared prefix")
    wl.add_argument("--dataset", type=Path, help="chat: JSONL file of conversations")
    wl.add_argument("--num-prompts", type=int, default=200, help="requests per load point (default: %(default)s)")
    wl.add_argument("--seed", type=int, default=0,
                    help="prompts and arrivals; a repeat against the same server wants its own seed (or "
                         "the server's prefix caching off), or it meets its prompts in the prefix cache")
    wl.add_argument("--warmup", type=int, default=1, help="unmeasured requests before the first point")

    load = parser.add_argument_group("load")
    load.add_argument("--rate", "--request-rate", dest="rate", default=None,
                      help="requests/s (Poisson; inf: all at once); default inf")
    load.add_argument("--rates", help="a sweep of rates, e.g. 1,2,4,inf")
    load.add_argument("--concurrency", "--max-concurrency", dest="concurrency",
                      help="fixed concurrency (or a sweep: 1,8,64), rate inf unless --rate(s)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1: Poisson)")

    judge = parser.add_argument_group("SLOs and capacity")
    judge.add_argument("--slo", action="append", default=[],
                       help="run-wide limit [pNN-]METRIC:MS (metric ttft, tpot, itl, e2el; default p99), "
                            "e.g. p99-ttft:500,p99-itl:50")
    judge.add_argument("--goodput", nargs="+", default=[],
                       help="per-request limits for goodput, METRIC:MS (vLLM's syntax), e.g. ttft:500 tpot:50")
    judge.add_argument("--percentiles", default="50,90,99", help="percentiles reported (default: %(default)s)")
    judge.add_argument("--capacity", action="store_true",
                       help="search the highest Poisson rate that meets every --slo")
    judge.add_argument("--capacity-start", type=float, default=1.0, help="first rate tried (req/s)")
    judge.add_argument("--capacity-max", type=float, default=4096.0, help="highest rate tried (req/s)")
    judge.add_argument("--capacity-tolerance", type=float, default=0.05, help="stop when the bracket is this narrow")
    judge.add_argument("--capacity-probes", type=int, default=14, help="at most this many runs")
    judge.add_argument("--capacity-seconds", type=float, default=30.0,
                       help="each probe: at least this many seconds of arrivals (and --num-prompts requests)")

    out = parser.add_argument_group("output")
    out.add_argument("--result-dir", type=Path, default=Path("."), help="where JSON and PNGs go")
    out.add_argument("--result-name", help="JSON file name (default: <time>-<label>-serve.json)")
    out.add_argument("--label", help="label in the file name (default: the server's host:port)")
    out.add_argument("--no-plots", action="store_true", help="JSON only")
    out.add_argument("--no-progress", action="store_true")
    out.add_argument("--no-server-metrics", action="store_true", help="do not sample GET /metrics")
    out.add_argument("--metrics-interval", type=float, default=0.5, help="seconds between /metrics samples")
    out.add_argument("--no-request-details", action="store_true", help="leave per-request rows out of the JSON")
    out.add_argument("--save-itls", action="store_true",
                     help="also keep every gap between each request's chunks, in ms (as vLLM's --save-detailed)")


def load_points(args: argparse.Namespace) -> list[LoadPoint]:
    if args.capacity:
        return []
    rates = [parse_rate(r) for r in (args.rates.split(",") if args.rates else [args.rate or "inf"]) if r.strip()]
    concurrencies: list[int | None] = [None]
    if args.concurrency:
        concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
        if any(c < 1 for c in concurrencies):
            raise ValueError("--concurrency values must be >= 1")
    return [LoadPoint(rate, c, args.burstiness) for c in concurrencies for rate in rates]


async def _first_model(base_url: str, headers: dict[str, str]) -> str:
    async with aiohttp.ClientSession() as session, session.get(base_url.rstrip("/") + "/v1/models",
                                                               headers=headers) as r:
        if r.status != 200:
            raise ValueError(f"GET /v1/models answered {r.status}: pass --model")
        data = await r.json()
    return str(data["data"][0]["id"])


class Bench:
    """Everything one invocation needs, built once from the arguments."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        try:
            self.percentiles = [float(p) for p in args.percentiles.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"--percentiles {args.percentiles!r}: numbers, e.g. 50,90,99") from None
        if not self.percentiles or not all(0 < p <= 100 for p in self.percentiles):
            raise ValueError(f"--percentiles {args.percentiles!r}: each in (0, 100]")
        if args.request_timeout <= 0:
            raise ValueError("--request-timeout must be positive")
        self.percentile_keys = [metrics.percentile_key(p) for p in self.percentiles]
        self.slos = metrics.parse_slos(args.slo)
        self.goodput = metrics.parse_goodput(args.goodput)
        if args.capacity and not self.slos:
            raise ValueError("--capacity needs at least one --slo (e.g. --slo p99-ttft:500,p99-itl:50)")
        if args.workload == "chat" and args.endpoint != "chat":
            raise ValueError("the chat workload sends conversations: use --endpoint chat")
        if args.rate is not None and args.rates:
            raise ValueError("give --rate or --rates, not both")
        if args.capacity and (args.rate is not None or args.rates or args.concurrency):
            raise ValueError("--capacity chooses the rates itself: drop --rate/--rates/--concurrency")
        if args.prefix_len and args.workload != "shared-prefix":
            raise ValueError("--prefix-len is for --workload shared-prefix")
        if args.dataset and args.workload != "chat":
            raise ValueError("--dataset is for --workload chat")
        self.points = load_points(args)
        output_default = None if args.workload == "chat" else "256"
        output = args.output_len or output_default
        self.spec = workload.WorkloadSpec(
            kind=args.workload, num_prompts=args.num_prompts,
            input_len=workload.LengthRange.parse(args.input_len, "--input-len"),
            output_len=workload.LengthRange.parse(output, "--output-len") if output else None,
            prefix_len=args.prefix_len, chat_path=args.dataset, seed=args.seed)
        self.tokenizer: workload.Tokenizer | None = None
        self.options = RunOptions(percentiles=self.percentiles, goodput_limits_ms=self.goodput or None,
                                  slos=self.slos, sample_server_metrics=not args.no_server_metrics,
                                  metrics_interval_s=args.metrics_interval, progress=not args.no_progress,
                                  keep_requests=not args.no_request_details, keep_itls=args.save_itls)
        self.config: ClientConfig | None = None
        self.ignore_eos_refused: str | None = None  # the server's message, when it refused the field

    def requests(self, stream: str, num: int) -> list[workload.BenchRequest]:
        spec = workload.WorkloadSpec(**{**self.spec.__dict__, "stream": stream, "num_prompts": num})
        return workload.build(spec, self.tokenizer)

    def count_tokens(self, text: str) -> int:
        assert self.tokenizer is not None
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    async def setup(self) -> None:
        args = self.args
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.model or await _first_model(args.base_url, headers)
        # Conversations need no tokenizer unless asked for one (to size answers from the file's
        # assistant turns, or to count output tokens of a server that sends no usage).
        tok_source = args.tokenizer or (model if args.workload != "chat" else None)
        if tok_source is not None:
            self.tokenizer = workload.load_tokenizer(tok_source)
        self.config = ClientConfig(base_url=args.base_url, model=model, endpoint=args.endpoint,
                                   api_key=args.api_key, ignore_eos=args.ignore_eos,
                                   temperature=args.temperature, extra_body=args.extra_body,
                                   request_timeout_s=args.request_timeout)

    async def warmup(self) -> None:
        assert self.config is not None
        if self.args.warmup < 1:
            return
        requests = self.requests("warmup", self.args.warmup)
        failed = await self._failures(requests, self.config)
        if failed and self.config.ignore_eos and failed[0].error_kind == "http_400" \
                and "ignore_eos" in failed[0].error_message:
            # `ignore_eos` where the server takes it: a server that refuses the field by name
            # (OpenAI's own API does) is measured without it, and the result says so.
            plain = dataclasses.replace(self.config, ignore_eos=False)
            if not await self._failures(requests, plain):
                self.ignore_eos_refused = failed[0].error_message
                self.config = plain
                print(f"note: the server refused ignore_eos ({self.ignore_eos_refused}); measuring without it, "
                      "so answers may end before max_tokens", file=sys.stderr)
                return
        if failed:
            raise RuntimeError(f"warm-up request failed ({failed[0].error_kind}): {failed[0].error_message}")

    @staticmethod
    async def _failures(requests: list[workload.BenchRequest], config: ClientConfig) -> list[Any]:
        async with new_session() as session:
            records = await asyncio.gather(*(send(session, config, r, 0.0) for r in requests))
        return [r for r in records if not r.ok]

    async def run_point(self, point: LoadPoint, index: int, stream: str, num: int) -> dict[str, Any]:
        """Prompts from `stream`; arrivals seeded with seed + index."""
        assert self.config is not None
        counter = self.count_tokens if self.tokenizer is not None else None
        run = await run_point(self.config, self.requests(stream, num), point, seed=self.args.seed + index,
                              options=self.options, count_tokens=counter)
        return {**run, "prompts": stream}

    async def main(self) -> dict[str, Any]:
        await self.setup()
        await self.warmup()
        assert self.config is not None
        payload: dict[str, Any] = {
            "base_url": self.args.base_url, "model": self.config.model, "endpoint": self.args.endpoint,
            "ignore_eos": self.config.ignore_eos, "ignore_eos_refused": self.ignore_eos_refused, "workload": {**_jsonable(self.spec.__dict__),
                                                              "describe": self.spec.describe()},
            "percentiles": self.percentiles, "slos": [s.describe() for s in self.slos],
            "goodput_limits_ms": self.goodput or None, "args": _args_json(self.args), "runs": [],
        }
        for i, point in enumerate(self.points):
            run = await self.run_point(point, i, f"point {i}", self.args.num_prompts)
            payload["runs"].append(run)
            print(f"{point.describe()}: {run['completed']} ok, {run['failed']} failed, "
                  f"{run['request_throughput']:.2f} req/s, {run['output_throughput']:.1f} out tok/s, "
                  f"p99 TTFT {_ms(run, 'ttft', 'p99')}, p99 ITL {_ms(run, 'itl', 'p99')}", flush=True)
        if self.args.capacity:
            payload["capacity"] = await self.capacity()
        return payload

    async def capacity(self) -> dict[str, Any]:
        count = 0

        async def probe(rate: float) -> dict[str, Any]:
            nonlocal count
            count += 1
            num = max(self.args.num_prompts, math.ceil(rate * self.args.capacity_seconds))
            run = await self.run_point(LoadPoint(rate, None, 1.0), count - 1, f"probe {count}", num)
            met = "meets" if run["slos"]["met"] else "misses"
            measured = ", ".join(f"{c['slo'].split(' ')[0]} {c['metric'].upper()} {_f(c['measured_ms'])} ms"
                                 for c in run["slos"]["checks"])
            print(f"probe {count}: {rate:.3g} req/s {met} the SLOs ({measured}; {run['failed']} failed)",
                  flush=True)
            return run

        spec = capacity.CapacitySearch(start_rate=self.args.capacity_start, max_rate=self.args.capacity_max,
                                       min_rate=min(0.05, self.args.capacity_start),
                                       tolerance=self.args.capacity_tolerance, max_probes=self.args.capacity_probes)
        result = await capacity.search(probe, spec)
        result["answer"] = capacity.answer_line(result, self.slos, self.spec.describe())
        return result


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ms(run: dict[str, Any], metric: str, stat: str) -> str:
    value = run["latency_ms"][metric][stat]
    return "-" if value is None else f"{value:.1f} ms"


def _args_json(args: argparse.Namespace) -> dict[str, Any]:
    """The options as given (the API key left out)."""
    out = {}
    for k, v in vars(args).items():
        if k == "api_key":
            v = "(set)" if v else None
        out[k] = str(v) if isinstance(v, Path) else v
    return out


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, workload.LengthRange):
            out[k] = {"low": v.low, "high": v.high}
        elif isinstance(v, Path):
            out[k] = str(v)
        else:
            out[k] = v
    return out


def run(args: argparse.Namespace) -> int:
    try:
        bench = Bench(args)
    except ValueError as exc:
        print(f"bench serve: {exc}", file=sys.stderr)
        return 2
    try:
        payload = asyncio.run(bench.main())
    except (ValueError, RuntimeError, aiohttp.ClientError, OSError) as exc:
        print(f"bench serve: {exc}", file=sys.stderr)
        return 1
    runs = payload["runs"] + [p["run"] for p in payload.get("capacity", {}).get("probes", [])]
    label = args.label or (urlparse(args.base_url).netloc or args.base_url)
    path = report.result_path(args.result_dir, args.result_name, label)
    if not args.no_plots:
        try:
            from appliance.benchserve import plots

            stem = path.with_suffix("")
            path.parent.mkdir(parents=True, exist_ok=True)
            payload["plots"] = [p.name for p in plots.write_all(stem, payload["runs"] or runs,
                                                               bench.percentile_keys, payload.get("capacity"))]
        except RuntimeError as exc:
            print(f"bench serve: {exc}", file=sys.stderr)
            payload["plots"] = []
    report.write(path, payload)
    print(report.table(payload["runs"] or runs, bench.percentile_keys))
    errors = report.errors_text(runs)
    if errors:
        print(errors)
    warnings = report.warnings_text(runs)
    if warnings:
        print(warnings)
    print(f"wrote {path}" + "".join(f"\nwrote {path.parent / p}" for p in payload.get("plots", [])))
    if "capacity" in payload:
        print(payload["capacity"]["answer"])
    return 0 if any(r["completed"] for r in runs) else 1


def add_arguments_bench(parser: argparse.ArgumentParser) -> None:
    """`llm-appliance bench serve ...` (appliance/cli.py routes the `serve` suite here)."""
    parser.add_argument("suite", choices=["serve"], help="serve: load an OpenAI-compatible server over HTTP")
    add_arguments(parser)


def run_bench(args: argparse.Namespace) -> int:
    return run(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.benchserve.command", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
