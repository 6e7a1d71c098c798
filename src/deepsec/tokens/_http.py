"""HTTP plumbing shared by the token sources: sessions, error mapping, redaction.

Internal module.  Sessions never read the environment (``trust_env=False``):
``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` and proxy variables cannot replace
the configured ``ca_file`` or silently widen trust.  Without ``ca_file`` the
``certifi`` bundle requests ships with is used.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import re
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import requests
import requests.adapters
from urllib3.util.ssl_ import create_urllib3_context

from ..errors import TokenAcquisitionError

__all__ = [
    "Deadline",
    "DeadlineExceeded",
    "TimeoutSession",
    "current_deadline",
    "deadline",
    "error_from_exception",
    "install_log_redaction",
    "parse_retry_after",
    "register_secret",
    "scrub",
]

_T = TypeVar("_T")

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_MAX_DESCRIPTION = 300


class Deadline:
    """The time budget of one token fetch: every request and socket operation inside it.

    While active (:func:`deadline`) it is thread-local: MSAL and our own code
    call the session from the thread that runs the fetch, so every HTTP
    request of that fetch (MSAL's discovery and token calls, OCI retries) and
    every socket operation under them (connect, TLS handshake, each read and
    write) gets only the time that is left.  It also records the largest
    ``Retry-After`` the provider sent during the fetch (MSAL drops the headers
    of the answers it returns).
    """

    __slots__ = ("at", "retry_after", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        #: The provider's largest ``Retry-After`` (seconds) in this fetch, if any.
        self.retry_after: float | None = None

    def remaining(self) -> float:
        """Seconds left (negative once expired)."""
        return self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        """Whether the budget is spent."""
        return self.at <= time.monotonic()

    def note(self, response: Any) -> None:
        """Remember the ``Retry-After`` of an HTTP answer."""
        value = parse_retry_after(getattr(response, "headers", {}).get("Retry-After"))
        if value is not None and (self.retry_after is None or value > self.retry_after):
            self.retry_after = value


_local = threading.local()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[Deadline]:
    """Bound every session request and TLS socket operation in this thread to ``seconds``."""
    previous = getattr(_local, "deadline", None)
    budget = _local.deadline = Deadline(seconds)
    try:
        yield budget
    finally:
        _local.deadline = previous


def current_deadline() -> Deadline | None:
    """The active :class:`Deadline` of this thread, if any."""
    return getattr(_local, "deadline", None)


class DeadlineExceeded(requests.exceptions.Timeout):
    """The fetch's time budget ran out before a request could start."""


_RETRY_AFTER_SECONDS = re.compile(r"\s*(\d{1,9})(?:\.\d{1,6})?\s*")


def parse_retry_after(value: object) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or ``None``."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    match = _RETRY_AFTER_SECONDS.fullmatch(value)
    if match:
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class _DeadlineSSLSocket(ssl.SSLSocket):
    """A TLS socket whose every operation gets at most the fetch's remaining time.

    A per-operation timeout does not bound a call: a provider that drips one
    byte a second satisfies every read.  Shrinking each operation's timeout to
    what is left of the thread's :class:`Deadline` does, with no watchdog
    thread.  Without an active deadline it behaves like ``ssl.SSLSocket``.
    """

    def _bounded(self, operation: Callable[[], _T]) -> _T:
        budget = current_deadline()
        if budget is None:
            return operation()
        left = budget.remaining()
        if left <= 0:
            raise TimeoutError("the token fetch's deadline has passed")
        base = self.gettimeout()
        super().settimeout(left if base is None else min(base, left))
        try:
            return operation()
        finally:
            with contextlib.suppress(OSError):  # closed meanwhile: keep the real error
                super().settimeout(base)

    def do_handshake(self, block: bool = False) -> None:
        self._bounded(lambda: super(_DeadlineSSLSocket, self).do_handshake(block))

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        return self._bounded(lambda: super(_DeadlineSSLSocket, self).read(len, buffer))

    def write(self, data: Any) -> int:
        return self._bounded(lambda: super(_DeadlineSSLSocket, self).write(data))

    def send(self, data: Any, flags: int = 0) -> int:
        return self._bounded(lambda: super(_DeadlineSSLSocket, self).send(data, flags))


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """Gives urllib3 a TLS context that makes :class:`_DeadlineSSLSocket` sockets.

    No CA is loaded here: requests passes ``ca_file`` (or certifi's bundle)
    to urllib3, which loads it into this context, so trust is unchanged.
    """

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        context = create_urllib3_context()
        context.sslsocket_class = _DeadlineSSLSocket
        kwargs["ssl_context"] = context
        super().init_poolmanager(*args, **kwargs)


class TimeoutSession(requests.Session):
    """A session bounded by the thread's :class:`Deadline`, ignoring the environment.

    Every request gets ``timeout`` (connect and read) or the time left of the
    active deadline if that is less, and fails at once when it is spent;
    every TLS socket operation is bounded by the deadline too (so a provider
    dripping bytes cannot stretch a call).  MSAL ignores its own
    ``timeout=`` argument when it is given an ``http_client``; binding the
    timeout here enforces it on every request, including MSAL's OpenID
    discovery in its constructor.
    """

    def __init__(self, timeout: float, ca_file: str | None) -> None:
        super().__init__()
        self.trust_env = False
        self.verify = ca_file if ca_file else True
        self.timeout = timeout
        self.mount("https://", _DeadlineAdapter())

    def request(  # type: ignore[override]
        self, method: str, url: str | bytes, *args: Any, **kwargs: Any
    ) -> Any:
        """Send a request within the session's timeout and the thread's deadline."""
        budget = current_deadline()
        seconds = self.timeout
        if budget is not None:
            left = budget.remaining()
            if left <= 0:
                raise DeadlineExceeded("the token fetch's deadline has passed")
            seconds = min(seconds, left)
        kwargs["timeout"] = (seconds, seconds)
        response = super().request(method, url, *args, **kwargs)
        if budget is not None:
            budget.note(response)
        return response


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


def is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` ended a fetch because time ran out.

    A body read cut short by the deadline surfaces from requests as a
    ``ConnectionError`` (it wraps urllib3's read timeout), so an exception
    raised once the thread's deadline has passed counts as a timeout too.
    """
    if isinstance(exc, (requests.Timeout, socket.timeout)):
        return True
    budget = current_deadline()
    return budget is not None and budget.expired and isinstance(exc, OSError)


def timeout_error(what: str) -> TokenAcquisitionError:
    """The error of a fetch that did not finish within its deadline."""
    budget = current_deadline()
    within = f" within {budget.seconds:g} s" if budget is not None else ""
    return TokenAcquisitionError(
        f"{what}: the identity provider did not answer{within} (timeout)", error="timeout"
    )


def _tls_causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: causes, contexts, and exceptions among its args
    (urllib3 keeps the ssl error as a MaxRetryError's ``reason``)."""
    seen: set[int] = set()
    stack: list[object] = [exc]
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        stack.extend((item.__cause__, item.__context__, getattr(item, "reason", None)))
        stack.extend(item.args)


def _certificate_rejected(exc: BaseException) -> bool:
    """Whether a TLS failure is the provider's certificate failing verification."""
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in _tls_causes(exc))


def _tls_failure_name(exc: BaseException) -> str:
    """The class name of the innermost ssl error (never its text)."""
    name = type(exc).__name__
    for e in _tls_causes(exc):
        if isinstance(e, ssl.SSLError):
            name = type(e).__name__
    return name


def error_from_exception(
    exc: BaseException, what: str, secrets: Iterable[str] = ()
) -> TokenAcquisitionError:
    """Map a transport or parsing exception to a :class:`TokenAcquisitionError`.

    The message holds our own words, the exception class name and the
    provider's error code, never the exception's text, which may echo a
    request, nor the provider's description (it may name the end user).
    """
    if is_timeout(exc):
        return timeout_error(what)
    if isinstance(exc, requests.exceptions.SSLError):
        if _certificate_rejected(exc):
            return TokenAcquisitionError(
                f"{what}: TLS verification with the identity provider failed "
                "(check ca_file and the provider's certificate)",
                error="connection_error",
            )
        # A handshake cut short (the provider or a proxy dropped it): no
        # reason to send the operator after certificates.
        return TokenAcquisitionError(
            f"{what}: the TLS connection to the identity provider failed "
            f"({_tls_failure_name(exc)})",
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
        return TokenAcquisitionError(
            f"{what}: the identity provider answered HTTP {status}",
            error=error or "server_error",
            correlation_id=correlation,
            status=status,
            retry_after=parse_retry_after(getattr(response, "headers", {}).get("Retry-After")),
            description=scrub(description, secrets) if description else None,
        )
    # ValueError/TypeError/OverflowError: MSAL choking on a reply field of the
    # wrong type (int() of an expires_in that is NaN, a list...).
    if isinstance(exc, (ValueError, TypeError, OverflowError, json.JSONDecodeError)):
        return TokenAcquisitionError(
            f"{what}: the identity provider sent an invalid response ({type(exc).__name__})",
            error="invalid_response",
        )
    return TokenAcquisitionError(
        f"{what}: unexpected failure ({type(exc).__name__})", error="unexpected_error"
    )
