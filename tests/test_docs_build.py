"""The docs build strictly and render Sphinx roles as cross-references, not text."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


pytestmark = pytest.mark.timeout(120)


def test_rewrite_roles_forms() -> None:
    pytest.importorskip("griffe")
    from mkdocs_sphinx_roles import rewrite_roles

    text = rewrite_roles(
        "See :class:`~deepsec.web.WebSettings`, :py:func:`deepsec.install`, "
        ":meth:`mark`, :exc:`the error <deepsec.ConfigError>` and ``:class:``."
    )
    assert '<autoref identifier="deepsec.web.WebSettings" optional><code>WebSettings</code>' in text
    assert "<code>deepsec.install</code>" in text
    assert '<autoref identifier="mark" optional>' in text
    assert '<autoref identifier="deepsec.ConfigError" optional><code>the error</code>' in text
    assert "``:class:``" in text  # not a role: left alone
    resolved = rewrite_roles(":meth:`mark`", lambda name: f"pkg.Server.{name}")
    assert 'identifier="pkg.Server.mark"' in resolved


def test_mkdocs_build_strict_has_no_raw_sphinx_role(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (the docs extra); scripts/test-all builds the docs")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api_page = (site / "api" / "web" / "index.html").read_text()
    assert 'class="autorefs autorefs-internal"' in api_page  # roles became links
    from check_docs_roles import raw_roles  # imports the extension's ROLES (griffe)

    assert raw_roles(site) == {}
