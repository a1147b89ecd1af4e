"""`vllm bench serve`, run several times in one process: vLLM's own command line (its CLI's `main`,
so its parser, set-up and benchmark exactly) called once per run, so that vLLM's ~15 s of imports
are paid once per cross-check, while the server starts, and not before every run.

    python3 bench/vllm_bench_client.py        (with vLLM on PYTHONPATH: `. .peer/vllm-setup.sh`)

It prints `ready <vLLM version>` once vLLM is imported, then reads one line per run from stdin:
`LOGFILE ARG...` (shell words; ARGs as after `vllm bench serve`), runs it with its output in LOGFILE
and answers `done <exit status>`; `quit` (or the end of stdin) ends it. Those answers are the only
lines on its stdout; anything else it would print goes to stderr. Used by crosscheck_bench_serve.sh.
"""

from __future__ import annotations

import gc
import os
import shlex
import sys
import time
import traceback


class GcPauses:
    """The garbage collector's pauses in this process while a run goes (`gc.callbacks`): a pause
    stalls the loop that timestamps the chunks, so every stream reads one longer gap. Printed
    at the end of the run's log as one line `gc pauses: ...` (issue 14's ITL p99 question)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((info.get("generation", -1), time.perf_counter() - self._start))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> str:
        parts = []
        for gen in (0, 1, 2):
            times = [t for g, t in self.pauses if g == gen]
            if times:
                parts.append(f"gen{gen} {len(times)} x, {sum(times) * 1e3:.1f} ms total, max {max(times) * 1e3:.2f} ms")
        over = sum(1 for _, t in self.pauses if t > 0.005)
        return "gc pauses: " + ("; ".join(parts) or "none") + f"; over 5 ms: {over}"


def run_one(cli_main, log_path: str, argv: list[str]) -> int:  # noqa: ANN001 - vLLM's function
    """vLLM's CLI on `vllm bench serve ARGV`, fd 1 and 2 in LOGFILE meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log, GcPauses() as pauses:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.argv = ["vllm", "bench", "serve", *argv]
        try:
            cli_main()
            status = 0
        except SystemExit as exc:  # argparse errors, a benchmark that exits
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported in the run's log, the loop goes on
            traceback.print_exc()
            status = 1
        finally:
            print(pauses.summary(), flush=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return status


def main() -> int:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's prints and log lines never reach the answers
    from importlib.metadata import version

    from vllm.entrypoints.cli.main import main as cli_main

    # `vllm bench serve --help`: every import the CLI makes, now rather than in the first run.
    run_one(cli_main, os.devnull, ["--help"])
    answers.write(f"ready {version('vllm')}\n")
    for line in sys.stdin:
        words = shlex.split(line)
        if not words:
            continue
        if words == ["quit"]:
            break
        answers.write(f"done {run_one(cli_main, words[0], words[1:])}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
