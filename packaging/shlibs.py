"""The Debian packages a tree of bundled ELF files needs: what `dpkg-shlibdeps` would say.

Reads every ELF file's NEEDED entries (readelf), drops the libraries the tree ships itself (by
soname or file name), and maps the rest to the package owning the library on this host (ldconfig
+ dpkg -S). Libraries nobody on the host provides are printed on stderr: for the CUDA runtime
that is the driver's libcuda.so.1, which comes with the NVIDIA driver, not a package we can name.

Usage: shlibs.py ROOT -> "libc6, libstdc++6, ..." (one line)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def main(argv: list[str]) -> int:
    root = Path(argv[1])
    elves = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and ".so" in p.name or
             (p.is_file() and p.stat().st_mode & 0o111)]
    elves = [p for p in elves if is_elf(p)]
    shipped = {p.name for p in root.rglob("*.so*")}
    needed: set[str] = set()
    for elf in elves:
        out = subprocess.run(["readelf", "-d", "-W", str(elf)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if "(SONAME)" in line:
                shipped.add(line.rsplit("[", 1)[1].rstrip("]"))
            if "(NEEDED)" in line:
                needed.add(line.rsplit("[", 1)[1].rstrip("]"))
    cache: dict[str, str] = {}
    for line in subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout.splitlines()[1:]:
        name, _, path = line.strip().partition(" => ")
        soname = name.split(" ", 1)[0]
        if "x86-64" in name and soname not in cache:
            cache[soname] = path
    packages: set[str] = set()
    for soname in sorted(needed - shipped):
        if soname not in cache:
            print(f"shlibs: {soname}: not on this host (left to the operator)", file=sys.stderr)
            continue
        path = cache[soname]
        real = str(Path(path).resolve())
        # merged /usr: dpkg may know the file under /lib or /usr/lib, by its link or its real name
        candidates = [path, real] + [c.replace("/usr/lib/", "/lib/", 1) if c.startswith("/usr/")
                                     else "/usr" + c for c in (path, real)]
        for candidate in candidates:
            owner = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
            if owner.returncode == 0:
                break
        if owner.returncode != 0:
            print(f"shlibs: {soname} ({cache[soname]}): no package owns it", file=sys.stderr)
            continue
        packages.add(owner.stdout.split(":", 1)[0])
    print(", ".join(sorted(packages)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
