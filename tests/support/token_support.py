"""Helpers of the token-source tests: moving the token cache's clock forward."""

from __future__ import annotations

import time

import pytest

from deepsec.tokens import cache


def skip_ahead(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make the token cache's clock run ``seconds`` ahead of the real one.

    Only the cache's idea of "now" moves (remembered failures and token
    expiry); the network, MSAL and the identity provider keep real time.
    """
    monkeypatch.setattr(cache, "_time", lambda: time.time() + seconds)
