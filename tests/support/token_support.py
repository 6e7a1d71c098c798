"""Helpers of the token-source tests: the token cache's clock, a raw MSAL app."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msal
import pytest
import requests

from deepsec.testing.idp import LocalIdP
from deepsec.tokens import cache


def skip_ahead(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make the token cache's clock run ``seconds`` ahead of the real one.

    Only the cache's idea of "now" moves (remembered failures and token
    expiry); the network, MSAL and the identity provider keep real time.
    """
    monkeypatch.setattr(cache, "_time", lambda: time.time() + seconds)


class CacheClock:
    """The token cache's clock, stopped at ``now`` and moved by the test.

    Tests of expiry and refresh windows step it instead of sleeping: a real
    sleep inside a sub-second window failed whenever a loaded machine
    overslept.  Background refreshes still run on real threads, the network,
    MSAL and the identity provider keep real time.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = time.time()
        monkeypatch.setattr(cache, "_time", lambda: self.now)


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait (polling) until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def raw_msal_app(idp: LocalIdP) -> Any:
    """A plain MSAL confidential client of ``idp``, with no deepsec in between.

    For tests that show MSAL's own behaviour (why deepsec works around it).
    """
    session = requests.Session()
    session.trust_env = False
    session.verify = idp.ca_file
    return msal.ConfidentialClientApplication(
        idp.client_id,
        client_credential=idp.client_secret,
        authority=idp.authority,
        http_client=session,
        instance_discovery=False,
        azure_region=False,
    )
