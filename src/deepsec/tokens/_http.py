"""HTTP plumbing shared by the token sources: sessions, error mapping, redaction.

Internal module.  Sessions never read the environment (``trust_env=False``):
``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` and proxy variables cannot replace
the configured ``ca_file`` or silently widen trust.  Without ``ca_file`` the
``certifi`` bundle requests ships with is used.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import requests

from ..errors import TokenAcquisitionError
from .cache import jwt_expiry

__all__ = [
    "TimeoutSession",
    "error_from_exception",
    "install_log_redaction",
    "register_secret",
    "scrub",
]

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_MAX_DESCRIPTION = 300


class TimeoutSession(requests.Session):
    """A session that always applies ``timeout`` and ignores the environment.

    MSAL ignores its own ``timeout=`` argument when it is given an
    ``http_client``; binding the timeout here enforces it on every request,
    including MSAL's OpenID discovery in its constructor.
    """

    def __init__(self, timeout: float, ca_file: str | None) -> None:
        super().__init__()
        self.trust_env = False
        self.verify = ca_file if ca_file else True
        self.timeout = (timeout, timeout)

    def request(  # type: ignore[override]
        self, method: str, url: str | bytes, *args: Any, **kwargs: Any
    ) -> Any:
        """Send a request with the session's (connect, read) timeout."""
        kwargs["timeout"] = self.timeout
        return super().request(method, url, *args, **kwargs)


class _SecretRegistry:
    """Secrets that redaction must remove, held only as long as their owner lives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: dict[int, str] = {}

    def add(self, owner: object, secret: str) -> None:
        if len(secret) < 6:
            return  # too short to redact without mangling ordinary text
        with self._lock:
            self._secrets[id(owner)] = secret
        weakref.finalize(owner, self._remove, id(owner))

    def _remove(self, ident: int) -> None:
        with self._lock:
            self._secrets.pop(ident, None)

    def values(self) -> list[str]:
        with self._lock:
            return list(self._secrets.values())


_registry = _SecretRegistry()


#: Lifetime assumed for a token whose reply gives neither ``expires_in`` nor an ``exp``.
DEFAULT_LIFETIME = 60.0


def token_expiry(token: str, expires_in: object, started: float) -> float:
    """When a freshly issued token expires (epoch seconds).

    The reply's ``expires_in`` counted from ``started`` (the request time, so
    network delay shortens rather than lengthens it), capped by the JWT's own
    ``exp`` when there is one; the ``exp`` alone otherwise; else a minute.
    """
    exp = jwt_expiry(token)
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool):
        expires_at = started + float(expires_in)
        return min(expires_at, exp) if exp is not None else expires_at
    return exp if exp is not None else started + DEFAULT_LIFETIME


def register_secret(owner: object, secret: str) -> None:
    """Have log redaction remove ``secret`` while ``owner`` is alive."""
    _registry.add(owner, secret)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without JWTs, registered secrets or ``secrets``; truncated."""
    for secret in (*secrets, *_registry.values()):
        if secret:
            text = text.replace(secret, "***")
    text = _JWT.sub("<jwt>", text)
    if len(text) > _MAX_DESCRIPTION:
        text = text[:_MAX_DESCRIPTION] + "…"
    return text


class _RedactingFilter(logging.Filter):
    """Rewrites a record's message without tokens or registered secrets.

    MSAL logs a malformed token response verbatim ("Token response is not in
    json format: ...") and that body may hold a token.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: drop the arguments
            message = str(record.msg)
        cleaned = scrub(message)
        if cleaned != message or record.args:
            record.msg = cleaned
            record.args = None
        return True


_FILTER = _RedactingFilter()
_installed: set[str] = set()


def install_log_redaction(names: Iterable[str]) -> None:
    """Attach the redacting filter to the loggers ``names`` (idempotent)."""
    for name in names:
        if name not in _installed:
            logging.getLogger(name).addFilter(_FILTER)
            _installed.add(name)


def _provider_fields(response: Any) -> tuple[str | None, str | None, str | None]:
    """``error``, ``error_description`` and a correlation id from an HTTP error body."""
    try:
        body = response.json()
    except (ValueError, AttributeError):
        return None, None, None
    if not isinstance(body, Mapping):
        return None, None, None
    return provider_error_fields(body)


def provider_error_fields(body: Mapping[str, Any]) -> tuple[str | None, str | None, str | None]:
    """``error``, ``error_description`` and correlation id of an OAuth error body."""
    error = body.get("error")
    description = body.get("error_description")
    correlation = body.get("correlation_id") or body.get("trace_id") or body.get("opc-request-id")
    return (
        str(error)[:100] if error else None,
        str(description) if description else None,
        str(correlation)[:100] if correlation else None,
    )


def error_from_exception(
    exc: BaseException, what: str, secrets: Iterable[str] = ()
) -> TokenAcquisitionError:
    """Map a transport or parsing exception to a :class:`TokenAcquisitionError`.

    The message holds our own words, the exception class name and (scrubbed)
    provider fields, never the exception's text, which may echo a request.
    """
    if isinstance(exc, requests.Timeout):
        return TokenAcquisitionError(f"{what}: the identity provider timed out", error="timeout")
    if isinstance(exc, requests.exceptions.SSLError):
        return TokenAcquisitionError(
            f"{what}: TLS verification with the identity provider failed "
            "(check ca_file and the provider's certificate)",
            error="connection_error",
        )
    if isinstance(exc, requests.ConnectionError):
        return TokenAcquisitionError(
            f"{what}: cannot reach the identity provider ({type(exc).__name__})",
            error="connection_error",
        )
    if isinstance(exc, requests.HTTPError):
        response = exc.response
        status = getattr(response, "status_code", None)
        error, description, correlation = _provider_fields(response)
        message = f"{what}: the identity provider answered HTTP {status}"
        if description:
            message += f": {scrub(description, secrets)}"
        return TokenAcquisitionError(
            message,
            error=error or "server_error",
            correlation_id=correlation,
            status=status,
        )
    if isinstance(exc, (ValueError, json.JSONDecodeError)):
        return TokenAcquisitionError(
            f"{what}: the identity provider sent an invalid response ({type(exc).__name__})",
            error="invalid_response",
        )
    return TokenAcquisitionError(
        f"{what}: unexpected failure ({type(exc).__name__})", error="unexpected_error"
    )
