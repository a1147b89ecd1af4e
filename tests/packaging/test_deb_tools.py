"""The tools behind `make deb`: the man page covers every command, the app/runtime split is right.

The packages themselves are built and installed in a booted container by `make test-install`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import cli

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"


@pytest.fixture(scope="module")
def manpage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("man") / "llm-appliance.1"
    result = subprocess.run([sys.executable, str(PACKAGING / "man" / "gen_manpage.py"), "9.9.9"],
                            capture_output=True, text=True, timeout=300, check=True)
    out.write_text(result.stdout)
    return out


def test_manpage_has_a_section_per_command_and_action(manpage: Path) -> None:
    text = manpage.read_text()
    for name in cli._SUBCOMMANDS:  # noqa: SLF001
        assert f".SS llm\\-appliance {name.replace('-', chr(92) + '-')}" in text
    # Actions below a command (ctl status, config check, model fetch) each have their usage line.
    for usage in ("llm\\-appliance ctl status", "llm\\-appliance config check", "llm\\-appliance model fetch"):
        assert usage in text
    assert ".SH FILES" in text and "9.9.9" in text


def _command_paths(prefix: str, parser: argparse.ArgumentParser) -> list[str]:
    """`prefix` and every action below it, at any depth, as the parsers define them."""
    paths = [prefix]
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                paths += _command_paths(f"{prefix} {name}", sub)
    return paths


def test_manpage_names_every_command_path_and_bench_suite(manpage: Path) -> None:
    """Walk the CLI as `llm-appliance` builds it (each command's module adds its own parser; each
    `bench SUITE` is a module of its own) and find every command path in the page's usage lines."""
    text = " ".join(manpage.read_text().replace("\\-", "-").replace("\\fB", "").replace("\\fR", "").split())
    paths = []
    for name, (module, _help) in cli._SUBCOMMANDS.items():  # noqa: SLF001
        modules = [cli._BENCH_SUITES[s] for s in cli._BENCH_SUITES] if name == "bench" else [module]  # noqa: SLF001
        for module_name in modules:
            parser = argparse.ArgumentParser(prog=f"llm-appliance {name}")
            getattr(importlib.import_module(module_name), f"add_arguments_{name}")(parser)
            paths += _command_paths(f"llm-appliance {name}", parser)
    paths += [f"llm-appliance bench {suite}" for suite in cli._BENCH_SUITES]  # noqa: SLF001
    assert "llm-appliance bench serve" in paths and "llm-appliance ctl status" in paths
    assert [p for p in paths if p not in text] == []
    # bench serve's own options (not bench offline's) are documented.
    assert "--base-url" in text


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db not installed")
def test_manpage_renders_without_warnings(manpage: Path) -> None:
    result = subprocess.run(["man", "--warnings", "-l", "-P", "cat", str(manpage)], capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "MANWIDTH": "100", "LC_ALL": "C.UTF-8"})
    assert result.returncode == 0
    assert result.stderr == ""
    assert "llm-appliance ctl" in result.stdout


def _item(name: str, version: str, requires: list[str], requested: bool = False) -> dict[str, object]:
    return {"metadata": {"name": name, "version": version, "requires_dist": requires},
            "download_info": {"url": f"https://files.example/{name}-{version}-py3-none-any.whl"},
            "requested": requested}


def _split(tmp_path: Path, *args: object) -> set[str]:
    files = []
    for i, report in enumerate(a for a in args if isinstance(a, list)):
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps({"install": report}))
        files.append(str(path))
    mode, pyver = args[0], args[-1]
    out = subprocess.run([sys.executable, str(PACKAGING / "split_deps.py"), str(mode), *files, str(pyver)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return {u.rsplit("/", 1)[1].split("-")[0] for u in out.stdout.split()}


def test_split_keeps_torch_and_its_own_dependencies_out_of_the_app(tmp_path: Path) -> None:
    app = [
        _item("llm-appliance", "0.1.0", ["torch>=2.11", "transformers", "accelerate",
                                          "tomli>=1; python_version < '3.11'"], requested=True),
        _item("torch", "2.13.0", ["sympy", "filelock", "triton==3.7.1; platform_system == 'Linux'"], requested=True),
        _item("triton", "3.7.1", [], requested=True),
        _item("transformers", "5.17", ["filelock", "numpy", "tqdm[notebook]"]), _item("numpy", "2.4", []),
        _item("accelerate", "1.0", ["torch", "psutil"]),
        _item("filelock", "3.0", []), _item("sympy", "1.14", ["mpmath"]), _item("mpmath", "1.3", []),
        _item("psutil", "7.0", []), _item("tqdm", "4.67", ["ipywidgets; extra == 'notebook'"]),
        _item("ipywidgets", "8.0", []), _item("tomli", "2.0", []),
    ]
    # numpy rides with torch (its C API), although transformers needs it too.
    # tomli is only for Python < 3.11: not in the app for 3.11, but in it for 3.10.
    assert _split(tmp_path, "app", app, "3.11") == {"llm", "transformers", "accelerate", "filelock", "psutil",
                                                     "tqdm", "ipywidgets"}
    assert "tomli" in _split(tmp_path, "app", app, "3.10")
    runtime = [_item("torch", "2.13.0", ["sympy", "filelock", "triton"], requested=True),
               _item("triton", "3.7.1", [], requested=True), _item("sympy", "1.14", ["mpmath"]),
               _item("mpmath", "1.3", []), _item("filelock", "3.0", []), _item("numpy", "2.4", [], requested=True)]
    # filelock is the app's already: the runtime ships only what the app lacks.
    assert _split(tmp_path, "runtime", runtime, app, "3.11") == {"torch", "triton", "sympy", "mpmath", "numpy"}


def test_split_refuses_a_runtime_resolved_against_other_versions(tmp_path: Path) -> None:
    app = [_item("llm-appliance", "0.1.0", ["filelock"], requested=True), _item("filelock", "3.0", [])]
    runtime = [_item("torch", "2.13.0", ["filelock"], requested=True), _item("triton", "3.7.1", [], requested=True),
               _item("numpy", "2.4", [], requested=True), _item("filelock", "3.1", [])]
    for i, report in enumerate((runtime, app)):
        (tmp_path / f"r{i}.json").write_text(json.dumps({"install": report}))
    out = subprocess.run([sys.executable, str(PACKAGING / "split_deps.py"), "runtime", str(tmp_path / "r0.json"),
                          str(tmp_path / "r1.json"), "3.11"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "filelock 3.1 (runtime) vs 3.0 (app)" in out.stderr


@pytest.mark.parametrize("script", ["postinst", "prerm", "postrm"])
def test_maintainer_scripts_are_posix_sh(script: str) -> None:
    path = PACKAGING / "debian" / script
    assert path.stat().st_mode & 0o111
    subprocess.run(["sh", "-n", str(path)], check=True, timeout=30)
    if shutil.which("checkbashisms"):
        subprocess.run(["checkbashisms", str(path)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("dpkg") is None or not (REPO / ".venv" / "bin" / "python").exists(),
                    reason="needs dpkg and the dev venv")
def test_build_deb_refuses_a_cpu_runtime_it_cannot_build(tmp_path: Path) -> None:
    """trixie's Python 3.13 has no reachable CPU torch: asking for its runtime-cpu is an error that
    says what to install instead, at once (not a skip after minutes of resolving)."""
    if subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip() != "amd64":
        pytest.skip("build-deb.sh builds for amd64 only")
    (tmp_path / "wheels").mkdir()
    result = subprocess.run(["bash", str(PACKAGING / "build-deb.sh"), "--suite", "trixie", "--out", str(tmp_path / "out"),
                             "runtime-cpu"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "CPU_WHEELS": str(tmp_path / "wheels"), "TMPDIR": str(tmp_path)})
    assert result.returncode == 1
    assert "torch-2.13.0+cpu-cp313" in result.stderr and "llm-appliance-runtime-cuda" in result.stderr
    assert not any((tmp_path / "out").rglob("*.deb"))
