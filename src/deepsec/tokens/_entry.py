"""The token cache's value types: what a fetch returns, an entry, a fetch in flight.

Internal module; :class:`FetchResult` and :data:`Fetcher` are public through
:mod:`deepsec.tokens.cache`.  Shared by :class:`~deepsec.tokens.cache.TokenCache`
and the Redis-backed :class:`~deepsec.tokens.shared.SharedTokenCache`.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["FetchResult", "Fetcher"]


class FetchResult(NamedTuple):
    """What a fetch returns: the token and its absolute expiry (epoch seconds).

    With ``exact=True`` the safety margin is not applied: ``expires_at`` is
    already the moment the token stops being served (opaque tokens with a
    fixed lifetime).
    """

    token: str
    expires_at: float
    exact: bool = False


#: A blocking callable returning a fresh token; it may raise.
Fetcher = Callable[[], FetchResult]


class _Entry:
    """A cached token.  ``refresh_at`` is moved forward when a refresh starts."""

    __slots__ = ("expires_at", "fetch", "refresh_at", "token")

    def __init__(self, token: str, expires_at: float, refresh_at: float, fetch: Fetcher) -> None:
        self.token = token
        self.expires_at = expires_at
        self.refresh_at = refresh_at
        self.fetch = fetch

    def __repr__(self) -> str:  # never show the token
        return f"_Entry(expires_at={self.expires_at:.3f}, refresh_at={self.refresh_at:.3f})"


class _Flight(concurrent.futures.Future[str]):
    """A lookup's in-flight (or settled) fetch; ``source`` tells telemetry who answered."""

    #: ``idp``; ``l2`` when a shared cache answered; ``l1`` for a race lost to a store.
    source = "idp"
