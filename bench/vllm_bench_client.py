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

import os
import shlex
import sys
import traceback


def run_one(cli_main, log_path: str, argv: list[str]) -> int:  # noqa: ANN001 - vLLM's function
    """vLLM's CLI on `vllm bench serve ARGV`, fd 1 and 2 in LOGFILE meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
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
