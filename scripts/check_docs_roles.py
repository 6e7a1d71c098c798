"""Fail when a rendered docs page shows a raw Sphinx role (``:class:`...```) as text.

Usage: ``python scripts/check_docs_roles.py SITE_DIR`` after ``mkdocs build``;
``scripts/test-all`` runs it.  The roles are turned into cross-references by
``scripts/mkdocs_sphinx_roles.py``; this check proves none slipped through.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs_sphinx_roles import ROLES  # the roles the extension rewrites (this directory)

#: A role as Markdown renders it (``<code>`` from the backticks) or left raw.
RAW_ROLE = re.compile(r":(?:py:)?(?:" + "|".join(ROLES) + r"):(?:<code>|`)")


def raw_roles(site: Path) -> dict[str, int]:
    """Rendered pages (relative paths) that show raw roles, with how many."""
    found = {}
    for page in sorted(site.rglob("*.html")):
        count = len(RAW_ROLE.findall(page.read_text(encoding="utf-8")))
        if count:
            found[str(page.relative_to(site))] = count
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: check_docs_roles.py SITE_DIR", file=sys.stderr)
        return 2
    found = raw_roles(Path(argv[0]))
    for page, count in found.items():
        print(f"{page}: {count} raw Sphinx role(s)", file=sys.stderr)
    if not any(Path(argv[0]).rglob("*.html")):
        print("no rendered page found", file=sys.stderr)
        return 1
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
