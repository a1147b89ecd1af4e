"""Several appliances behind a real HAProxy on one machine, and what affinity buys.

`LocalFleet` starts N daemons on loopback (each with its [fleet] agent-check port), writes the
HAProxy config with `llm-appliance fleet haproxy --query` (maxconn asked from each box), runs
Debian's `haproxy` in the foreground on it, and waits until HAProxy sees every box UP. The fleet
tests (tests/fleet/test_fleet.py) and the benchmark below use it.

The benchmark (CPU is fine; the figures it records are relative):

- prefix-cache hit rate on a shared-prefix workload (a few long system prompts, many user
  questions) with affinity (`--balance prefix`) against round robin, from the boxes' /metrics;
- output tokens/s of three boxes against one behind the same HAProxy, same workload.

    python -m appliance_bench.fleet --out bench/results/fleet_cpu.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-fleet-test"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "appliance.cli", *args]


class Box:
    """One `llm-appliance serve` process on loopback with its agent check enabled."""

    def __init__(self, workdir: Path, name: str, *, max_num_seqs: int, max_model_len: int,
                 kv_cache_bytes: int) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.agent_port = free_port()
        self.control_socket = str(self.dir / "control.sock")
        self.config_file = self.dir / "appliance.toml"
        self.config_file.write_text(
            f"[engine]\nmax_model_len = {max_model_len}\nmax_num_seqs = {max_num_seqs}\n"
            f"max_num_batched_tokens = {max(max_model_len, 256)}\ncpu_kv_cache_bytes = {kv_cache_bytes}\n\n"
            # A slow step on a crowded CPU is not a stall: only a hung process should leave the pool.
            f"[server]\nstall_timeout_s = 120.0\ndrain_timeout_s = 120.0\n\n"
            f"[fleet]\nenabled = true\nport = {self.agent_port}\n\n"
            f"[[clients]]\nname = \"app\"\napi_key = \"{API_KEY}\"\n")
        self.stderr_path = self.dir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # One intra-op thread each: several boxes share this machine's cores (see tests/conftest.py).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(
                _cli("serve", "--config", str(self.config_file), "--port", str(self.http_port),
                     "--control-socket", self.control_socket),
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.stderr()[-3000:]}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready in {timeout_s} s:\n{self.stderr()[-3000:]}")

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        """The box's /metrics as {name: value} (labels dropped; one model per box)."""
        status, body = self.get("/metrics")
        assert status == 200, body
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            match = re.match(r"^([A-Za-z_:][\w:]*)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$", line)
            if match and not line.startswith("#"):
                out[match.group(1)] = out.get(match.group(1), 0.0) + float(match.group(2))
        return out

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(_cli("ctl", "--socket", self.control_socket, *args), cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""


class LocalFleet:
    """N boxes behind HAProxy on loopback. `url` is HAProxy's address; boxes are box1..boxN, the
    names HAProxy uses too."""

    def __init__(self, workdir: Path, num_boxes: int = 3, *, balance: str = "prefix", max_num_seqs: int = 4,
                 max_model_len: int = 512, kv_cache_bytes: int = 48 << 20, check_interval_s: float = 1.0) -> None:
        self.dir = workdir
        self.balance = balance
        self.check_interval_s = check_interval_s
        self.boxes = [Box(workdir, f"box{i + 1}", max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                          kv_cache_bytes=kv_cache_bytes) for i in range(num_boxes)]
        self.port = free_port()
        self.stats_socket = str(workdir / "haproxy.sock")
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.haproxy: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def box(self, name: str) -> Box:
        return next(b for b in self.boxes if b.name == name)

    def start(self, timeout_s: float = 600.0) -> None:
        try:
            for box in self.boxes:
                box.start()
            for box in self.boxes:
                box.wait_ready(timeout_s)
            self.write_config()
            self.start_haproxy()
            self.wait_until(lambda s: all(s[b.name]["status"] == "UP" for b in self.boxes), 60.0,
                            "every box UP in HAProxy")
        except BaseException:
            self.stop()
            raise

    def write_config(self) -> None:
        backends = []
        for box in self.boxes:
            backends += ["--backend", f"127.0.0.1:{box.http_port},name={box.name},agent-port={box.agent_port}"]
        result = subprocess.run(
            _cli("fleet", "haproxy", *backends, "--query", "--balance", self.balance,
                 "--bind", f"127.0.0.1:{self.port}", "--check-interval", str(self.check_interval_s),
                 "--agent-interval", str(self.check_interval_s), "--stats-socket", self.stats_socket,
                 "--log", "stdout format raw", "--user", "", "--chroot", "", "--foreground",
                 "-o", str(self.config_path), "--check"),
            cwd=REPO, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"fleet haproxy failed: {result.stderr}")

    def start_haproxy(self) -> None:
        haproxy = haproxy_binary()
        if haproxy is None:
            raise RuntimeError("haproxy is not installed")
        with open(self.log_path, "ab") as log:
            self.haproxy = subprocess.Popen([haproxy, "-db", "-f", str(self.config_path)], stdout=log,
                                            stderr=subprocess.STDOUT)

    def admin(self, command: str) -> str:
        """One command on HAProxy's stats socket (the runtime API)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(self.stats_socket)
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, dict[str, Any]]:
        """HAProxy's view of each box: status (UP, DOWN, DRAIN (agent), MAINT, ...), weight,
        maxconn, current and total sessions, and how many requests it retried or sent elsewhere after a
        failure on this box."""
        lines = self.admin("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        out: dict[str, dict[str, Any]] = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "appliances" and row.get("svname", "").startswith("box"):
                out[row["svname"]] = {"status": row["status"], "weight": int(row["weight"] or 0),
                                      "maxconn": int(row["slim"] or 0),
                                      "current": int(row["scur"] or 0), "total": int(row["stot"] or 0),
                                      "retried": int(row["wretr"] or 0) + int(row["wredis"] or 0)}
        return out

    def wait_until(self, predicate: Callable[[dict[str, dict[str, Any]]], bool], timeout_s: float,
                   what: str) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        states: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            if self.haproxy is None or self.haproxy.poll() is not None:
                raise RuntimeError(f"haproxy is not running:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                states = self.server_states()
            except OSError:  # just started: its socket is not there yet
                time.sleep(0.1)
                continue
            if predicate(states):
                return states
            time.sleep(0.1)
        raise AssertionError(f"HAProxy: not {what} within {timeout_s} s: {states}")

    def stop(self) -> None:
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            try:
                self.haproxy.wait(10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait()
        self.haproxy = None
        for box in self.boxes:
            box.stop()


# ----- the benchmark ----------------------------------------------------------------------------

_WORDS = ("river stone market lantern orbit violet cedar harbor signal meadow copper thunder velvet "
          "glacier ember canyon falcon summit prism willow beacon delta quartz nimbus").split()


def shared_prefix_workload(num_prefixes: int, questions_per_prefix: int, prefix_words: int,
                           seed: int = 0) -> list[list[dict[str, str]]]:
    """Chat requests: `num_prefixes` long system prompts, each with its own short questions, shuffled."""
    rng = random.Random(seed)
    requests = []
    for p in range(num_prefixes):
        system = f"You are assistant number {p}. " + " ".join(rng.choice(_WORDS) for _ in range(prefix_words))
        for q in range(questions_per_prefix):
            question = f"Question {q}: " + " ".join(rng.choice(_WORDS) for _ in range(6))
            requests.append([{"role": "system", "content": system}, {"role": "user", "content": question}])
    rng.shuffle(requests)
    return requests


def _chat(url: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[int, str, int]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = json.dumps({"model": "SmolLM2-135M-Instruct", "messages": messages, "max_tokens": max_tokens,
                       "temperature": 0.0, "ignore_eos": True})
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
        response = conn.getresponse()
        data = json.loads(response.read())
        tokens = data.get("usage", {}).get("completion_tokens", 0) if response.status == 200 else 0
        return response.status, response.getheader("X-Served-By") or "", tokens
    finally:
        conn.close()


def run_workload(fleet: LocalFleet, requests: list[list[dict[str, str]]], concurrency: int,
                 max_tokens: int) -> dict[str, Any]:
    before = {b.name: b.metrics() for b in fleet.boxes}
    served: dict[str, int] = {}
    statuses: dict[int, int] = {}
    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda m: _chat(fleet.url, m, max_tokens), requests))
    elapsed_s = time.monotonic() - t0
    output_tokens = 0
    for status, box, tokens in results:
        statuses[status] = statuses.get(status, 0) + 1
        served[box] = served.get(box, 0) + 1
        output_tokens += tokens
    after = {b.name: b.metrics() for b in fleet.boxes}

    def delta(name: str) -> float:
        return sum(after[b][name] - before[b].get(name, 0.0) for b in after)

    queries = delta("vllm:prefix_cache_queries_total")
    hits = delta("vllm:prefix_cache_hits_total")
    return {
        "requests": len(requests), "statuses": statuses, "served_by": dict(sorted(served.items())),
        "elapsed_s": round(elapsed_s, 3), "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / elapsed_s, 3),
        "prefix_cache_queries_tokens": queries, "prefix_cache_hits_tokens": hits,
        "prefix_cache_hit_rate": round(hits / queries, 4) if queries else 0.0,
        "prompt_tokens_computed": delta("vllm:prompt_tokens_total"),
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m appliance_bench.fleet", description=__doc__.split("\n")[0])
    parser.add_argument("--boxes", type=int, default=3)
    parser.add_argument("--prefixes", type=int, default=6, help="distinct system prompts")
    parser.add_argument("--questions", type=int, default=8, help="requests per system prompt")
    parser.add_argument("--prefix-words", type=int, default=120, help="words per system prompt")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--kv-cache-bytes", type=int, default=48 << 20, help="each box's KV cache (CPU)")
    parser.add_argument("--out", help="write the JSON result here too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from appliance_bench.results import result_header

    args = _parse_args(argv)
    requests = shared_prefix_workload(args.prefixes, args.questions, args.prefix_words)
    runs: dict[str, Any] = {}
    for label, boxes, balance in (("affinity", args.boxes, "prefix"), ("roundrobin", args.boxes, "roundrobin"),
                                  ("one_box", 1, "prefix")):
        workdir = Path(tempfile.mkdtemp(prefix="llma-fleet-", dir="/tmp"))
        fleet = LocalFleet(workdir, boxes, balance=balance, max_num_seqs=args.max_num_seqs,
                           kv_cache_bytes=args.kv_cache_bytes)
        try:
            fleet.start()
            # One request per box first, so compile and allocation warm-up is not in the figures.
            for box in fleet.boxes:
                _chat(f"http://127.0.0.1:{box.http_port}", [{"role": "user", "content": "warm up"}], 2)
            runs[label] = {"boxes": boxes, "balance": balance,
                           **run_workload(fleet, requests, args.concurrency, args.max_tokens)}
            print(label, json.dumps(runs[label]), file=sys.stderr, flush=True)
        finally:
            fleet.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    result = {
        **result_header(),
        "bench": "fleet",
        "note": "all boxes on one machine's CPU cores (one intra-op thread each): throughput ratios "
                "here say little about separate GPU boxes; the hit rates do not depend on the device",
        "cpu_count": os.cpu_count(),
        "workload": {"prefixes": args.prefixes, "questions_per_prefix": args.questions,
                     "prefix_words": args.prefix_words, "max_tokens": args.max_tokens,
                     "concurrency": args.concurrency, "max_num_seqs": args.max_num_seqs,
                     "kv_cache_bytes_per_box": args.kv_cache_bytes},
        "runs": runs,
        "three_vs_one_throughput": round(runs["affinity"]["output_tokens_per_s"]
                                         / runs["one_box"]["output_tokens_per_s"], 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
