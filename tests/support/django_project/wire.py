"""Helpers to read the wire server's records for the Django tests."""

from __future__ import annotations

from typing import Any

import spi_static


def user_token(name: str) -> str:
    """A JWT-shaped end-user token whose ``preferred_username`` is ``name``."""
    return spi_static.make_jwt({"sub": name, "preferred_username": name, "tid": "tests"})


def tagged(server: Any, tag: str, *, since: int) -> list[Any]:
    """Statements recorded since ``since`` whose SQL carries ``/* tag */``."""
    return server.find_statements(f"/* {tag} */", since=since)


def usernames(server: Any, tag: str, *, since: int, minimum: int = 1) -> set[str | None]:
    """The end users that the statements tagged ``tag`` ran as (None: no context).

    Fails unless at least ``minimum`` such statements were recorded, so a
    test cannot pass because nothing reached the server.
    """
    trips = tagged(server, tag, since=since)
    assert len(trips) >= minimum, f"expected >= {minimum} statements tagged {tag!r}, got {trips}"
    return {t.context.username if t.context is not None else None for t in trips}
