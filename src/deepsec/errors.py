"""Typed errors raised by deepsec.

Every message names the bad key or value but never contains a token, a client
secret or a key: messages are built only from our own text and from values that
the caller already treats as non-secret (key names, type names, provider error
codes and correlation ids).
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeepSecError",
    "IdentityError",
    "IdentityNotAccepted",
    "NoEndUserError",
    "TokenAcquisitionError",
    "TokenNotReadyError",
]


class DeepSecError(Exception):
    """Base class of every error deepsec raises on purpose."""


class ConfigError(DeepSecError, ValueError):
    """``end_user_sec_params`` (or an adapter's settings) are invalid.

    ``problems`` lists every problem found, one sentence each, so a single
    error reports all of them at once.
    """

    def __init__(self, problems: list[str] | str, *, where: str = "end_user_sec_params") -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        self.where = where
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {where}:\n{lines}")


class IdentityError(DeepSecError, ValueError):
    """An end-user identity, data role list or attribute mapping is malformed."""


class IdentityNotAccepted(IdentityError):
    """The end user's identity is well formed but does not fit the configuration.

    ``auth_flow="on_behalf_of"`` exchanges the end user's access token, so a
    ``(name, key)`` identity cannot be served.  Adapters answer 401
    ``invalid_token``: the client must present a bearer token.
    """


#: ``TokenAcquisitionError.error`` codes that mean "the end user's own token was
#: refused" (an on-behalf-of assertion that is invalid or already expired), as
#: opposed to a provider that failed or refused the application.
USER_TOKEN_REJECTED = frozenset({"invalid_grant", "expired_user_token"})


class TokenAcquisitionError(DeepSecError):
    """A database-access token could not be obtained from the identity provider.

    ``error`` is the provider's error code (``invalid_client``,
    ``invalid_grant``, ``timeout``...), ``correlation_id`` the provider's
    correlation/trace id when it sent one. The message never contains the
    client secret or a user token, nor the provider's ``error_description``:
    that text may name the end user (Entra: "AADSTS50173: ... user
    alice@..."), and the message reaches logs and error pages.  The scrubbed
    description is kept in ``description`` (not in ``str()`` or ``repr()``)
    for an application that decides to show it.

    ``retry_after`` is how many seconds the library will wait before it asks
    the provider again for this token (the failure is remembered that long
    and re-raised at once meanwhile); ``None`` when unknown.  Token sources
    set it to the provider's ``Retry-After``; the token cache replaces it with
    the window it really applies (capped; see docs/tokens.md), so a web
    adapter's ``Retry-After`` header can simply repeat it.
    """

    def __init__(
        self,
        message: str,
        *,
        error: str | None = None,
        correlation_id: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        description: str | None = None,
    ) -> None:
        self.error = error
        self.description = description
        self.correlation_id = correlation_id
        self.status = status
        self.retry_after = retry_after
        parts = [message]
        if error:
            parts.append(f"error={error}")
        if status is not None:
            parts.append(f"status={status}")
        if correlation_id:
            parts.append(f"correlation_id={correlation_id}")
        super().__init__("; ".join(parts))


class TokenNotReadyError(DeepSecError):
    """An asyncio connection needed a token that is not in the cache yet.

    The per-round-trip callback of an ``AsyncConnection`` runs on the event
    loop and never does network I/O.  Tokens are fetched ahead of time by
    ``async with deepsec.end_user(...)``, by ``await deepsec.prepare()``, by
    the ASGI/FastAPI adapters, and when a connection is opened or acquired.
    """


class NoEndUserError(DeepSecError):
    """Strict mode refused a statement issued with no current end user.

    Raised before anything is sent, on connections whose
    ``end_user_sec_params`` set ``require_end_user=True``.  Application-level
    work (migrations, health checks, schedulers) runs inside
    ``with deepsec.as_application():``; a web request with no identity should
    be answered 401 by the adapter's ``no_identity="deny"`` policy instead.
    """
