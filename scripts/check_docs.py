"""Build the documentation site and check that it reads as a reference.

``mkdocs build --strict`` catches broken links and unresolved cross-references;
it does not catch a docstring written for Sphinx: mkdocstrings renders
``:class:`X``` as the literal text ":class:X".  This scans the built HTML for
such roles and fails naming each page and role found.

    python scripts/check_docs.py [SITE_DIR]    # CI's docs stage

The same scan is used by ``tests/unit/test_docs_render_as_reference.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAW_ROLE = re.compile(r":(class|meth|func|attr|exc|mod|data|obj):")


def build(site: Path) -> None:
    """``mkdocs build --strict`` into ``site``, with this interpreter's mkdocs."""
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=ROOT,
        check=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def raw_roles(site: Path) -> list[str]:
    """``page: role`` for every Sphinx role left visible in the built pages."""
    found = []
    for page in sorted(site.rglob("*.html")):
        text = re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8"))
        for match in RAW_ROLE.finditer(text):
            found.append(f"{page.relative_to(site)}: {match.group(0)}")
    return found


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(argv[0]) if argv else Path(tmp)
        build(site)
        found = raw_roles(site)
    for line in found:
        print(f"raw Sphinx role on a page: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
