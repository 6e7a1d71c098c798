"""The one mapping from a refused request or an error to an HTTP answer.

Every adapter answers the same way because every rejection is built here:
malformed or missing identities (:func:`deny`) and errors raised while a
request is served (:func:`rejection_for_error`), each with its ``reason``,
status, headers and WebSocket close code.  Re-exported by :mod:`deepsec.web`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal, final

import oracledb

try:  # Python 3.11+; on 3.10 the backport, when installed (anyio brings it)
    _ExceptionGroup: type[BaseException] | None = BaseExceptionGroup  # type: ignore[name-defined,unused-ignore]
except NameError:  # pragma: no cover - Python 3.10
    try:
        from exceptiongroup import BaseExceptionGroup as _ExceptionGroup  # type: ignore[no-redef,import-not-found,unused-ignore]
    except ImportError:
        _ExceptionGroup = None

from .errors import (
    USER_TOKEN_REJECTED,
    IdentityNotAccepted,
    NoEndUserError,
    TokenAcquisitionError,
    TokenNotReadyError,
)

__all__ = ["Reason", "Rejection", "deny", "rejection_for_error"]

#: Why a request was refused (``Rejection.reason``; a metric attribute).
Reason = Literal[
    "malformed_identity",
    "no_identity",
    "user_token_rejected",
    "provider_unavailable",
    "token_not_ready",
]

# Seconds a client is told to wait when the error does not say (the
# TokenAcquisitionError / TokenNotReadyError ``retry_after`` attribute does).
_DEFAULT_RETRY_AFTER = {"provider_unavailable": 5.0, "token_not_ready": 1.0}


@final
@dataclass(frozen=True)
class Rejection:
    """An HTTP response an adapter sends instead of (or in place of) the app's.

    ``close_code`` is what a WebSocket gets when the server cannot send an
    HTTP response: 1008 (policy violation) for a refused identity, 1013 (try
    again later) for a token the library could not get.  Final: the request
    paths tell a rejection from a lease by its exact type (``type(x) is
    Rejection``, cheaper than ``isinstance``), so a subclass would be taken
    for a lease.
    """

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError("Rejection cannot be subclassed (adapters check its exact type)")

    status: int
    body: dict[str, str]
    headers: tuple[tuple[str, str], ...] = ()
    reason: Reason = "malformed_identity"

    @property
    def close_code(self) -> int:
        """The WebSocket close code for this rejection."""
        return 1013 if self.status >= 500 else 1008

    def json_body(self) -> bytes:
        """The body as compact UTF-8 JSON."""
        return json.dumps(self.body, separators=(",", ":")).encode()


def deny(message: str, status: int, *, reason: Reason, error: str | None = None) -> Rejection:
    """A 400/401 for the request's identity; 401s carry ``WWW-Authenticate``."""
    if status == 401:
        challenge = 'Bearer error="invalid_token"' if error else "Bearer"
        headers: tuple[tuple[str, str], ...] = (("WWW-Authenticate", challenge),)
    else:
        headers = ()
    body = {"error": error or ("unauthorized" if status == 401 else "bad_request")}
    body["detail"] = message
    return Rejection(status, body, headers, reason)


# The database rejected the end user's token (ORA-52601: expired, revoked,
# wrong audience), or the identity provider rejected it as an on-behalf-of
# assertion: the user must sign in again, which is a 401, not an outage.
_END_USER_TOKEN_REJECTED = 52601


def _oracle_error_code(exc: BaseException) -> int | None:
    """The ORA number of a python-oracledb error, also when a framework wrapped it.

    Django re-raises driver errors as ``django.db.DatabaseError`` *from* the
    original; SQLAlchemy keeps it as ``.orig``.
    """
    current: object = exc
    for _ in range(4):
        if isinstance(current, oracledb.DatabaseError):
            code = getattr(current.args[0], "code", None) if current.args else None
            return code if isinstance(code, int) else None
        current = getattr(current, "orig", None) or getattr(current, "__cause__", None)
        if current is None:
            return None
    return None


def _retry_after(exc: BaseException, reason: Reason) -> str:
    # What the library will actually do (the TOKENS helper's attribute), so a
    # client retrying on time finds the failure forgotten.
    value = getattr(exc, "retry_after", None)
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    ):
        return str(max(1, math.ceil(value)))
    return str(int(_DEFAULT_RETRY_AFTER[reason]))


def _unavailable(exc: BaseException, status: int, reason: Reason) -> Rejection:
    body = {"error": "token_unavailable", "detail": "the database-access token is unavailable"}
    error = getattr(exc, "error", None)
    if error:
        body["provider_error"] = str(error)
    correlation_id = getattr(exc, "correlation_id", None)
    if correlation_id:
        body["correlation_id"] = str(correlation_id)
    headers: tuple[tuple[str, str], ...] = ()
    if status == 503:
        headers = (("Retry-After", _retry_after(exc, reason)),)
    return Rejection(status, body, headers, reason)


def rejection_for_error(exc: BaseException, token_error_status: int = 503) -> Rejection | None:
    """The response for an end-user failure raised while serving a request.

    * The identity does not fit the configuration (a ``(name, key)`` user
      where ``on_behalf_of`` needs a token), or the end user's own token was
      rejected -- by the database (ORA-52601) or by the identity provider as an
      on-behalf-of assertion (``invalid_grant``, already expired): 401 with
      ``WWW-Authenticate: Bearer error="invalid_token"``; the user must sign in
      again.
    * A statement that requires an end user ran without one: 401.
    * Any other :class:`~deepsec.TokenAcquisitionError`, and
      :class:`~deepsec.TokenNotReadyError` (an asyncio statement found no
      token, e.g. dropped after ORA-52602): ``token_error_status`` (503 by
      default, with ``Retry-After``).

    Bodies carry the provider's error code and correlation id, never a token
    or secret.  ``None`` for every other exception: not ours to answer.  An
    exception group (a task group in the endpoint) is answered like its
    errors when every one of them is ours, with the first one's answer.
    """
    if _ExceptionGroup is not None and isinstance(exc, _ExceptionGroup):
        inner: tuple[BaseException, ...] = getattr(exc, "exceptions", ())
        answers = [rejection_for_error(e, token_error_status) for e in inner]
        if answers and all(a is not None for a in answers):
            return answers[0]
        return None
    if isinstance(exc, TokenAcquisitionError):
        if exc.error in USER_TOKEN_REJECTED:
            return deny(
                "the identity provider rejected the end user's token",
                401,
                reason="user_token_rejected",
                error="invalid_token",
            )
        return _unavailable(exc, token_error_status, "provider_unavailable")
    if isinstance(exc, TokenNotReadyError):
        return _unavailable(exc, token_error_status, "token_not_ready")
    if isinstance(exc, IdentityNotAccepted):
        return deny(
            "this service needs the end user's bearer token",
            401,
            reason="user_token_rejected",
            error="invalid_token",
        )
    if isinstance(exc, NoEndUserError):
        # Strict mode (``require_end_user``) refused a statement with no end
        # user: the client must identify itself, as under no_identity="deny".
        return deny("an end-user identity is required", 401, reason="no_identity")
    if _oracle_error_code(exc) == _END_USER_TOKEN_REJECTED:
        return deny(
            "the database rejected the end user's token",
            401,
            reason="user_token_rejected",
            error="invalid_token",
        )
    return None
