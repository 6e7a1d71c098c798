"""What the driver-hook tests share: end-user tokens, params and a clean slate.

The tokens come from ``spi_static`` (unsigned JWTs the wire test server reads
the user name from); :func:`fresh_hook_state` forgets every token source,
built security context and prefetch config, and installs the hook, so each
test starts cold and leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Iterator

import deepsec
import spi_static
from deepsec import prefetch
from deepsec.tokens import clear_token_sources

USERNAME_SQL = "select xs_sys_context('xs$session','username') from dual"


def user_token(name: str) -> str:
    """An end-user token the wire server reads the user name from."""
    return spi_static.make_jwt({"preferred_username": name, "sub": f"sub-{name}"})


def params(**extra: object) -> dict[str, object]:
    """``extra_auth_params`` with the test token module and ``extra`` keys."""
    return {"end_user_sec_params": {"spi_type": "spi_static", "client_id": "hr-app", **extra}}


def _reset() -> None:
    spi_static.reset()
    clear_token_sources()  # also drops the hook's built security contexts
    prefetch.forget_prefetch_configs()  # prepare() covers only this test's configs
    deepsec.install()


def fresh_hook_state() -> Iterator[None]:
    """Body of an autouse fixture: a clean slate before and after the test."""
    _reset()
    yield
    _reset()
