"""Shared pytest configuration of the test suite."""

from __future__ import annotations

import os
from importlib.metadata import entry_points


def _plugin_autoloaded(module: str) -> bool:
    """Whether pytest already loads ``module`` through its pytest11 entry point.

    Listing a plugin in ``pytest_plugins`` that the installed package also
    registers as an entry point makes pytest fail ("Plugin already registered
    under a different name"), so it is listed only when not auto-loaded
    (package not installed, or PYTEST_DISABLE_PLUGIN_AUTOLOAD set).
    """
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == module for ep in entry_points(group="pytest11"))


_DEEPSEC_PLUGIN = "deepsec.testing.pytest_plugin"
pytest_plugins = [] if _plugin_autoloaded(_DEEPSEC_PLUGIN) else [_DEEPSEC_PLUGIN]
# The local identity provider's fixtures (``local_idp``, ``idp``).
pytest_plugins.append("deepsec.testing.idp_fixtures")
