"""A real browser (Debian's chromium, driven by Playwright) signs in as two users.

The page must show each user's own name *as the database reports it* and the
rows the wire test server's emulated row policy grants that user (alice: her
own row; carol, holding the ``hr_viewer`` data role: every row), then, after
signing out, no end user and no rows at all.  Chromium is installed by
``scripts/test-all`` when missing; this test skips -- saying why -- only when
chromium or Playwright is truly unavailable, and fails instead when
``DEEPSEC_REQUIRE_BROWSER=1`` (set by ``scripts/test-all`` once chromium is
present).  ``playwright install`` is never used.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from deepsec.demo import EMPLOYEES

pytestmark = pytest.mark.timeout(90)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    path = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
    )
    problem = None
    if path is None:
        problem = "chromium is not installed (scripts/test-all installs it with apt-get as root)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is not installed (pip install -e '.[test]')"
    if problem is not None:
        if os.environ.get("DEEPSEC_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required but {problem}")
        print(f"SKIPPING browser test: {problem}", file=sys.stderr)
        pytest.skip(problem)
    assert path is not None
    return path


def table_names(page) -> list[str]:
    """The employee names in the page's table, as the browser renders them."""
    return page.locator("tbody tr:not(.empty) td:first-child").all_inner_texts()


def test_two_users_sign_in_and_out_in_a_real_browser(served, hr_env):
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        seen = {}
        try:
            for user in ("alice", "carol"):
                context = browser.new_context()
                page = context.new_page()
                page.goto(f"{served.base_url}/signin")
                page.select_option("#user", user)
                page.click("#signin")
                page.wait_for_url(f"{served.base_url}/")
                who = page.locator("#db-user")
                assert who.get_attribute("data-db-user") == f"{user}@example.test"
                assert f"{user}@example.test" in who.inner_text()
                seen[user] = table_names(page)
                cookie = next(c for c in context.cookies() if c["name"] == "identity")
                assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
                # The page script cannot read the HttpOnly identity cookie.
                assert "identity" not in page.evaluate("document.cookie")
                page.click("#signout")
                page.wait_for_url(f"{served.base_url}/")
                assert page.locator("#db-user").get_attribute("data-db-user") == ""
                assert "no end user" in page.locator("#db-user").inner_text()
                assert table_names(page) == []
                assert page.locator("tbody tr.empty").inner_text() == (
                    "The database returned no rows."
                )
                assert not [c for c in context.cookies() if c["name"] == "identity"]
                context.close()
        finally:
            browser.close()
    assert seen == {"alice": ["alice"], "carol": [row[0] for row in EMPLOYEES]}
