"""Where benchmark results go: bench/results/<date>-<device>-<commit>[-<kind>].json, with device,
date and commit recorded inside as well."""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import re
import subprocess

import torch

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def git_commit() -> str:
    """The short commit of the checkout; $LLM_APPLIANCE_COMMIT where there is no .git (GPU copies)."""
    env = os.environ.get("LLM_APPLIANCE_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=RESULTS_DIR.parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def result_header() -> dict[str, object]:
    return {
        "device": device_name(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def write_result(payload: dict[str, object], kind: str, directory: pathlib.Path | None = None) -> pathlib.Path:
    """Write payload (with the header merged in) as JSON and return its path."""
    header = result_header()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(header["device"])).strip("-").lower()
    date = str(header["date"])[:10]
    directory = directory or RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{date}-{slug}-{header['commit']}-{kind}.json"
    path.write_text(json.dumps({**header, **payload}, indent=2, default=str) + "\n")
    return path
