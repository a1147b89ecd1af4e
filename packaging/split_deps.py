"""Split one pip resolution into what the app package ships and what a runtime package ships.

Input: pip's installation reports (`pip install --dry-run --report FILE`, JSON, one per resolve).
The app's report resolves the app together with torch and triton for the target Python; the app
package gets every distribution reachable from the app WITHOUT passing through torch, triton or
numpy. A runtime's report resolves torch, triton and numpy; the runtime package gets its
distributions minus the app's (the app's site-packages comes first on sys.path, so a copy there would be dead).

Markers are evaluated for the TARGET interpreter (the resolve ran on the host's, with
--python-version), with the extras each distribution was asked for (by the user or by the
requirement that pulled it in).

Usage:
  split_deps.py app REPORT PYVER            -> one download URL per line (the app's set)
  split_deps.py runtime REPORT APP_REPORT PYVER -> the runtime's URLs (minus the app's names)
A name on both sides with different versions is an error: the app was resolved against another
torch than this runtime's, and mixing them is untested.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Stop points: these come from the runtime package, never the app. numpy goes with torch: torch's
# extensions are built against its C API, and at ~13 MB compressed it alone would put the app's
# package over its 30 MB budget for every upgrade.
RUNTIME_ROOTS = frozenset({"torch", "triton", "numpy"})


@dataclass(frozen=True)
class Dist:
    name: str
    version: str
    url: str
    requires: tuple[str, ...]
    extras: tuple[str, ...]
    requested: bool


def load(report_path: str) -> dict[str, Dist]:
    report = json.loads(Path(report_path).read_text())
    dists: dict[str, Dist] = {}
    for item in report["install"]:
        meta = item["metadata"]
        name = canonicalize_name(meta["name"])
        dists[name] = Dist(name, meta["version"], item["download_info"]["url"],
                           tuple(meta.get("requires_dist") or ()), tuple(item.get("requested_extras") or ()),
                           bool(item.get("requested")))
    return dists


def target_env(pyver: str) -> dict[str, str]:
    env = default_environment()
    env.update(python_version=pyver, python_full_version=f"{pyver}.0", implementation_name="cpython",
               platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
               platform_machine="x86_64", os_name="posix")
    return env


def deps_of(dist: Dist, extras: frozenset[str], env: dict[str, str]) -> list[tuple[str, frozenset[str]]]:
    """(name, extras asked of it) for each requirement of `dist` that applies with `extras`."""
    out = []
    for spec in dist.requires:
        req = Requirement(spec)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            out.append((canonicalize_name(req.name), frozenset(req.extras)))
    return out


def app_set(dists: dict[str, Dist], pyver: str) -> dict[str, Dist]:
    env = target_env(pyver)
    stack = [(d.name, frozenset(d.extras)) for d in dists.values() if d.requested and d.name not in RUNTIME_ROOTS]
    # A distribution is visited again when asked for an extra not seen yet (hf-hub[hf_xet] and co.).
    visited: dict[str, frozenset[str]] = {}
    while stack:
        name, extras = stack.pop()
        if name in RUNTIME_ROOTS or (name in visited and extras <= visited[name]):
            continue
        if name not in dists:
            raise SystemExit(f"split_deps: {name} is required but not in the resolution")
        visited[name] = visited.get(name, frozenset()) | extras
        stack.extend(deps_of(dists[name], visited[name], env))
    return {name: dists[name] for name in visited}


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "app":
        chosen = app_set(load(argv[2]), argv[3])
    elif len(argv) == 5 and argv[1] == "runtime":
        runtime, app = load(argv[2]), app_set(load(argv[3]), argv[4])
        clash = [f"{n} {runtime[n].version} (runtime) vs {app[n].version} (app)"
                 for n in runtime if n in app and runtime[n].version != app[n].version]
        if clash:
            raise SystemExit("split_deps: the app and the runtime resolved different versions: " + ", ".join(clash))
        missing = RUNTIME_ROOTS - runtime.keys()
        if missing:
            raise SystemExit(f"split_deps: the runtime resolution lacks {sorted(missing)}")
        chosen = {n: d for n, d in runtime.items() if n not in app}
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for dist in sorted(chosen.values(), key=lambda d: d.name):
        print(dist.url)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
