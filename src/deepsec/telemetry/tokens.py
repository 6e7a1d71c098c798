"""Token telemetry: lookups by where the answer came from, and each identity-provider call.

A token source's cache holds one :class:`TokenTelemetry` (from
:func:`for_source`), with its attributes built once; without opentelemetry it
holds :data:`NO_TOKEN_TELEMETRY`, which lets a cache hit cost one flag check.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from .instruments import _Instruments, _instruments
from .names import (
    ATTR_AUTH_FLOW,
    ATTR_ERROR_TYPE,
    ATTR_HTTP_STATUS,
    ATTR_SERVER_ADDRESS,
    ATTR_SPI_TYPE,
    ATTR_TOKEN_SOURCE,
    TOKEN_FETCH_SPAN,
    TOKEN_SOURCES,
    error_type,
)

if TYPE_CHECKING:
    from ..config import EndUserSecConfig

# -- tokens --------------------------------------------------------------------------


def _server_address(authority: str | None) -> str | None:
    if not authority:
        return None
    try:
        return urlsplit(authority).hostname
    except ValueError:
        return None


class TokenTelemetry:
    """Token events of one token source, with its attributes built once.

    The source's :class:`~deepsec.tokens.cache.TokenCache` calls :meth:`hit`
    for a lookup answered from memory (``l1``) or from the shared cache
    (``l2``), wraps a lookup that had to wait for a fetch in :meth:`lookup`,
    and each identity-provider call in :meth:`fetch`.  The cache checks
    :attr:`enabled` first, so without opentelemetry a hit costs one flag
    check.
    """

    __slots__ = ("_fetch_base", "_hits")

    #: False only for :data:`NO_TOKEN_TELEMETRY`: lets a cache skip even the call.
    enabled: bool = True

    def __init__(self, spi_type: str, auth_flow: str, server_address: str | None = None) -> None:
        base = {ATTR_SPI_TYPE: spi_type, ATTR_AUTH_FLOW: auth_flow}
        self._hits: dict[str, dict[str, Any]] = {
            s: {ATTR_TOKEN_SOURCE: s, **base} for s in TOKEN_SOURCES
        }
        fetch_base = {ATTR_TOKEN_SOURCE: "idp", **base}
        if server_address:
            fetch_base[ATTR_SERVER_ADDRESS] = server_address
        self._fetch_base: dict[str, Any] = fetch_base

    def hit(self, source: str = "l1") -> None:
        """Count a lookup answered by ``source`` (``l1`` or ``l2``)."""
        inst = _instruments()
        if inst is not None:
            inst.token_requests.add(1, self._hits[source])

    def lookup(self, flight: Any) -> _Lookup:
        """Context manager around a lookup that waits for ``flight`` (a fetch).

        Counts it on exit with ``flight.source`` (``idp``, or ``l2`` when the
        shared cache answered it), with ``error.type`` when it failed.
        """
        return _Lookup(self, flight)

    def fetch(self) -> _Fetch:
        """Context manager around one identity-provider call: span and duration."""
        return _Fetch(self)

    def request(self, source: str, error: BaseException | None = None) -> None:
        """Count one lookup answered by ``source``, failed with ``error`` if given."""
        inst = _instruments()
        if inst is None:
            return
        attrs = self._hits[source]
        if error is not None:
            attrs = {**attrs, ATTR_ERROR_TYPE: error_type(error)}
        inst.token_requests.add(1, attrs)


class _Lookup:
    __slots__ = ("_flight", "_owner")

    def __init__(self, owner: TokenTelemetry, flight: Any) -> None:
        self._owner = owner
        self._flight = flight

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        source = getattr(self._flight, "source", "idp")
        if exc is None:
            self._owner.request(source)
        elif isinstance(exc, Exception):  # not a cancellation or interrupt
            self._owner.request(source, exc)


class _Fetch:
    __slots__ = ("_inst", "_owner", "_span", "_span_cm", "_started")

    def __init__(self, owner: TokenTelemetry) -> None:
        self._owner = owner
        self._inst: _Instruments | None = None

    def __enter__(self) -> None:
        inst = _instruments()
        if inst is None:
            return
        self._inst = inst
        # Exceptions are not recorded as span events: their messages may hold a
        # provider's error_description, which can name the end user.
        self._span_cm = inst.tracer.start_as_current_span(
            TOKEN_FETCH_SPAN,
            kind=inst.internal_kind,
            attributes=self._owner._fetch_base,
            record_exception=False,
            set_status_on_exception=False,
        )
        self._span = self._span_cm.__enter__()
        self._started = time.perf_counter()

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        inst = self._inst
        if inst is None:
            return
        duration = time.perf_counter() - self._started
        attrs = self._owner._fetch_base
        if exc is not None:
            kind = error_type(exc)
            attrs = {**attrs, ATTR_ERROR_TYPE: kind}
            self._span.set_attribute(ATTR_ERROR_TYPE, kind)
            status = getattr(exc, "status", None)
            if isinstance(status, int) and not isinstance(status, bool):
                self._span.set_attribute(ATTR_HTTP_STATUS, status)
            self._span.set_status(inst.status(inst.error_code, kind))
        inst.fetch_duration.record(duration, attrs)
        self._span_cm.__exit__(et, exc, tb)


class _NoTokenTelemetry(TokenTelemetry):
    """What a token cache uses when opentelemetry is absent: records nothing.

    Callers check :attr:`enabled` and never call it; the methods are safe anyway.
    """

    __slots__ = ()
    enabled = False

    def __init__(self) -> None:
        super().__init__("", "")

    def hit(self, source: str = "l1") -> None:
        """Nothing."""

    def request(self, source: str, error: BaseException | None = None) -> None:
        """Nothing."""

    def fetch(self) -> _Fetch:
        """A context manager that records nothing."""
        return _NULL_FETCH


class _NullFetch(_Fetch):
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        return None


NO_TOKEN_TELEMETRY: Final[TokenTelemetry] = _NoTokenTelemetry()
_NULL_FETCH = _NullFetch(NO_TOKEN_TELEMETRY)


def for_source(config: EndUserSecConfig) -> TokenTelemetry:
    """The token telemetry of a token source built for ``config``.

    :data:`NO_TOKEN_TELEMETRY` (records nothing, costs a method call) when
    opentelemetry is not installed.
    """
    if _instruments() is None:
        return NO_TOKEN_TELEMETRY
    return TokenTelemetry(config.spi_type, config.auth_flow, _server_address(config.authority))


def record_token_request(
    config: EndUserSecConfig, source: str, error: BaseException | None = None
) -> None:
    """Count one token lookup for ``config`` answered by ``source`` (``l1``, ``l2``, ``idp``).

    For caches that have no :class:`TokenTelemetry` at hand, e.g. a shared
    (Redis) cache reporting ``source="l2"``.
    """
    if source not in TOKEN_SOURCES:
        raise ValueError(f"source must be one of {sorted(TOKEN_SOURCES)}")
    if _instruments() is not None:
        for_source(config).request(source, error)
