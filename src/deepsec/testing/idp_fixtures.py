"""Alias of :mod:`deepsec.testing.pytest_plugin`, where the identity provider fixtures now live.

Kept so ``pytest_plugins = ["deepsec.testing.idp_fixtures"]`` and
``from deepsec.testing.idp_fixtures import reset_token_state`` keep working;
new code loads ``deepsec.testing.pytest_plugin`` only.
"""

from __future__ import annotations

from .pytest_plugin import idp, local_idp, reset_token_state

__all__ = ["idp", "local_idp", "reset_token_state"]
