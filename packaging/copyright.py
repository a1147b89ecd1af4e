"""Write a DEP-5 debian/copyright for a package that bundles Python distributions.

One `Files:` stanza per bundled distribution (its top-level paths in site-packages), with the
license its metadata declares (License-Expression, else License, else the Trove classifiers) and
the license files it ships, which stay installed next to it.

Usage: copyright.py SITE_PACKAGES "what this package is" > copyright
"""

from __future__ import annotations

import os
import sys
import time
from email.parser import Parser
from pathlib import Path


def license_of(meta: dict[str, str], classifiers: list[str]) -> str:
    expr = (meta.get("License-Expression") or "").strip()
    if expr:
        return expr
    text = (meta.get("License") or "").strip()
    if text and "\n" not in text and len(text) < 80:
        return text
    found = [c.split("::")[-1].strip() for c in classifiers if c.startswith("License ::")]
    return " or ".join(found) if found else "other (see the license files named in Comment)"


def main(argv: list[str]) -> int:
    site, what = Path(argv[1]), argv[2]
    year = time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))).tm_year
    out = ["Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
           "Upstream-Name: " + what.split(" ")[0], f"Comment: {what}.", "",
           "Files: usr/share/doc/* usr/share/lintian/*",
           f"Copyright: {year} llm-appliance maintainers (the packaging)", "License: Apache-2.0", ""]
    for info in sorted(site.glob("*.dist-info")):
        msg = Parser().parsestr((info / "METADATA").read_text(errors="replace"), headersonly=True)
        meta = {k: v for k, v in msg.items()}
        classifiers = msg.get_all("Classifier") or []
        tops: list[str] = []
        record = info / "RECORD"
        if record.exists():
            for line in record.read_text().splitlines():
                top = line.split(",", 1)[0].split("/", 1)[0]
                if top and top not in tops and not top.endswith(".dist-info") and top != "..":
                    tops.append(top)
        licenses = sorted(str(p.relative_to(site)) for p in info.rglob("*") if p.is_file()
                          and p.name.upper().startswith(("LICEN", "COPYING", "NOTICE")))
        rel = site.as_posix().split("/opt/", 1)[-1]
        files = " ".join(f"opt/{rel}/{t}" for t in [*tops, info.name])
        out += [f"Files: {files}",
                f"Copyright: the {meta.get('Name')} {meta.get('Version')} authors"
                + (f" ({' '.join(meta['Author'].split())})" if meta.get("Author") else ""),
                f"License: {' '.join(license_of(meta, classifiers).split())}"]
        if licenses:
            out.append("Comment: license text in " + ", ".join(f"opt/{rel}/{x}" for x in licenses))
        out.append("")
    sys.stdout.write("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
