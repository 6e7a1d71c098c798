"""pytest fixtures for the local identity provider.

``local_idp``
    A session-scoped running :class:`~deepsec.testing.idp.LocalIdP` (its own
    test CA; ``local_idp.ca_file`` is the PEM clients trust).
``idp``
    The same provider for one test: request log, faults, issued-token list
    and lifetime settings reset before and after the test, and every token
    source and MSAL application forgotten, so each test starts cold.  Build
    ``end_user_sec_params`` with ``idp.azure_params(auth_flow=...)`` and
    ``idp.oci_params()``.

Load with ``pytest_plugins = ["deepsec.testing.idp_fixtures"]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .idp import LocalIdP

__all__ = ["idp", "local_idp", "reset_token_state"]


def reset_token_state() -> None:
    """Forget every token source, cached token and MSAL application.

    Also forgets which configs :func:`deepsec.prepare` fetches for, so one
    test's identity providers (often stopped by now) are not asked again in
    the next; connections still open register theirs again when next used.
    """
    from ..hook import forget_prefetch_configs
    from ..tokens import clear_token_sources

    clear_token_sources()  # also drops MSAL applications
    forget_prefetch_configs()


@pytest.fixture(scope="session")
def local_idp() -> Iterator[LocalIdP]:
    """A running local HTTPS identity provider for the whole session."""
    provider = LocalIdP().start()
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture
def idp(local_idp: LocalIdP) -> Iterator[LocalIdP]:
    """The session's provider, reset for this test (log, faults, caches)."""
    local_idp.reset()
    reset_token_state()
    try:
        yield local_idp
    finally:
        local_idp.reset()
        reset_token_state()
