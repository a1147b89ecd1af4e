"""The default-model cache: location, reuse of a finished directory, and the build lock.

The real download + conversion runs in test_loader's default-model test (through the shared cache);
here a temporary cache stands in so nothing is downloaded.
"""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

import pytest

from appliance import cli
from appliance.models import fetch


def _fake_complete(model_dir: Path) -> None:
    model_dir.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (model_dir / name).write_text("{}")


def test_model_path_cli_follows_the_cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    assert cli.main(["model", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct")
    assert cli.main(["model", "path", "--cache-dir", str(tmp_path / "other")]) == 0
    assert capsys.readouterr().out.strip().startswith(str(tmp_path / "other"))


def test_a_finished_directory_is_reused(tmp_path: Path) -> None:
    target = fetch.default_model_dir(tmp_path)
    _fake_complete(target)
    assert fetch.ensure_default_model(tmp_path, progress=False) == target  # no download: nothing to build


def test_a_waiting_process_takes_the_directory_another_one_built(tmp_path: Path) -> None:
    """While one process holds the build lock, another waits, then finds the finished directory."""
    target = fetch.default_model_dir(tmp_path)
    target.parent.mkdir(parents=True)
    lock = target.parent / f".{fetch.DEFAULT_MODEL_NAME}.lock"
    result: list[Path] = []
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: result.append(fetch.ensure_default_model(tmp_path, progress=False)))
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and not result  # blocked on the lock, not building
        _fake_complete(target)  # "the other process" finishes its build
        fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(timeout=30)
    assert result == [target]
