"""Ready-made ``resolver`` callables for ``DEEPSEC["resolver"]``.

A resolver takes the Django request and returns an identity (a token string
or a ``(name, key_or_None)`` tuple), a full :class:`~deepsec.EndUserContext`,
or ``None`` for "no end user".  When a resolver is configured the
``identity`` cookie and ``Authorization`` header are not read.
"""

from __future__ import annotations

from typing import Any

__all__ = ["django_user"]


def django_user(request: Any) -> tuple[str, None] | None:
    """The authenticated Django user as a local database end user ``(username, None)``.

    Anonymous requests (or requests that never went through
    ``AuthenticationMiddleware``) have no end user.  The database must know
    a local end user of that name (``CREATE END USER ...``).
    """
    user = getattr(request, "user", None)
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    username = user.get_username()
    if not isinstance(username, str) or not username.strip():
        return None
    return (username, None)
