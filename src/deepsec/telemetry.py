"""OpenTelemetry metrics and traces for deepsec (optional, through ``opentelemetry-api``).

The rest of the library calls the small ``record_*`` functions and
:class:`TokenTelemetry` methods below at its event points.  When
``opentelemetry`` cannot be imported they do nothing, and nothing is imported:
the import is tried lazily, on the first event.  When it can, events go to the
*globally configured* meter and tracer providers (meter and tracer named
``deepsec``); with no provider configured the API's no-op one answers.  There
is no deepsec setting to turn this on.

Security rule: attribute values come only from fixed vocabularies (token
source, context action, rejection reason, error codes from a known list),
from configuration that is not secret (``spi_type``, ``auth_flow``, the
identity provider's host) and from HTTP status codes.  Never a token, a
secret, an exception message (a provider's ``error_description`` may name
the user) or a raw identity; the opt-in end-user pseudonym is a keyed hash.

Instruments, attributes and the rejection reasons are documented in
``docs/observability.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, get_args
from urllib.parse import urlsplit

from ._rejections import Reason
from .errors import TokenAcquisitionError

if TYPE_CHECKING:
    from ._rejections import Rejection
    from .config import EndUserSecConfig
    from .context import EndUserContext

__all__ = [
    "ATTR_AUTH_FLOW",
    "ATTR_CONTEXT_ACTION",
    "ATTR_END_USER",
    "ATTR_ERROR_TYPE",
    "ATTR_HTTP_STATUS",
    "ATTR_REJECTION_REASON",
    "ATTR_SERVER_ADDRESS",
    "ATTR_SPI_TYPE",
    "ATTR_TOKEN_SOURCE",
    "CONTEXT_ACTIONS",
    "CONTEXT_CHANGES",
    "INSTRUMENTATION_NAME",
    "NO_TOKEN_TELEMETRY",
    "REJECTION_REASONS",
    "REQUESTS_REJECTED",
    "TOKEN_FETCH_DURATION",
    "TOKEN_FETCH_SPAN",
    "TOKEN_REQUESTS",
    "TOKEN_SOURCES",
    "TokenTelemetry",
    "available",
    "collect_summary",
    "end_user_pseudonym",
    "error_type",
    "for_source",
    "record_context_change",
    "record_end_user",
    "record_rejection",
    "record_token_request",
    "use_providers",
]

#: Name of the meter and of the tracer.
INSTRUMENTATION_NAME: Final = "deepsec"

# -- instrument and span names ---------------------------------------------------
TOKEN_REQUESTS: Final = "deepsec.token.requests"
TOKEN_FETCH_DURATION: Final = "deepsec.token.fetch.duration"
CONTEXT_CHANGES: Final = "deepsec.context.changes"
REQUESTS_REJECTED: Final = "deepsec.requests.rejected"
TOKEN_FETCH_SPAN: Final = "deepsec.token.fetch"

# -- attribute names -------------------------------------------------------------
ATTR_TOKEN_SOURCE: Final = "deepsec.token.source"
ATTR_SPI_TYPE: Final = "deepsec.spi_type"
ATTR_AUTH_FLOW: Final = "deepsec.auth_flow"
ATTR_ERROR_TYPE: Final = "error.type"
ATTR_SERVER_ADDRESS: Final = "server.address"
ATTR_CONTEXT_ACTION: Final = "deepsec.context.action"
ATTR_HTTP_STATUS: Final = "http.response.status_code"
ATTR_REJECTION_REASON: Final = "deepsec.rejection.reason"
#: OpenTelemetry's attribute for a pseudonymous end-user id (the keyed hash).
ATTR_END_USER: Final = "enduser.pseudo.id"

#: ``deepsec.token.source`` values: in-process cache, shared cache, identity provider.
TOKEN_SOURCES: Final = frozenset({"l1", "l2", "idp"})
#: ``deepsec.context.action`` values.
CONTEXT_ACTIONS: Final = frozenset({"set", "switch", "clear"})
#: ``deepsec.rejection.reason`` values: every ``Rejection.reason`` (deepsec.web).
REJECTION_REASONS: Final = frozenset(get_args(Reason))

# Error codes that may become ``error.type``: OAuth 2.0 / Entra ID / OCI codes
# and deepsec's own.  Anything else a provider sends is reported as the
# exception's class name: a provider-controlled string must not reach a
# metric (cardinality, and it could carry anything).
_KNOWN_ERRORS: Final = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_resource",
        "access_denied",
        "server_error",
        "temporarily_unavailable",
        "interaction_required",
        "consent_required",
        "login_required",
        "timeout",
        "connection_error",
        "invalid_response",
        "unexpected_error",
        "expired_token",
        "expired_user_token",
    }
)


class _Instruments:
    """The instruments and tracer events are recorded with (one set at a time)."""

    __slots__ = (
        "context_changes",
        "error_code",
        "fetch_duration",
        "get_current_span",
        "internal_kind",
        "rejected",
        "status",
        "token_requests",
        "tracer",
    )

    def __init__(self, meter_provider: Any = None, tracer_provider: Any = None) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        from . import __version__

        # Without explicit providers the global ones are used; before the app
        # configures them the API hands out proxies that start recording once
        # it does, so importing deepsec early loses nothing.
        meter = (meter_provider or metrics.get_meter_provider()).get_meter(
            INSTRUMENTATION_NAME, __version__
        )
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(
            INSTRUMENTATION_NAME, __version__
        )
        self.token_requests = meter.create_counter(
            TOKEN_REQUESTS,
            unit="{request}",
            description="Token lookups by the hook, prepare() or an adapter, by where "
            "the answer came from",
        )
        self.fetch_duration = meter.create_histogram(
            TOKEN_FETCH_DURATION,
            unit="s",
            description="Duration of each call to the identity provider",
        )
        self.context_changes = meter.create_counter(
            CONTEXT_CHANGES,
            unit="{change}",
            description="End-user security contexts set, switched or cleared on connections",
        )
        self.rejected = meter.create_counter(
            REQUESTS_REJECTED,
            unit="{request}",
            description="Requests the web adapters answered themselves instead of the app",
        )
        self.get_current_span = trace.get_current_span
        self.internal_kind = SpanKind.INTERNAL
        self.status: Any = Status
        self.error_code: Any = StatusCode.ERROR


log = logging.getLogger(__name__)
_lock = threading.Lock()
_NOT_LOADED: Any = object()
#: The active instruments; None when opentelemetry is not importable.
_active: Any = _NOT_LOADED


def _load() -> _Instruments | None:
    global _active
    with _lock:
        if _active is _NOT_LOADED:
            try:
                _active = _Instruments()
            except ImportError:
                _active = None
            except Exception as exc:
                # A broken OpenTelemetry install (a half-upgraded package, a
                # provider that raises) must never fail a statement: record
                # nothing in this process, say so once.  The class name only:
                # the text is the library's, not ours to vouch for.
                _active = None
                log.warning(
                    "OpenTelemetry is installed but could not be loaded (%s); deepsec "
                    "records no metrics or traces in this process",
                    type(exc).__name__,
                )
        return _active  # type: ignore[no-any-return]


def _instruments() -> _Instruments | None:
    active = _active
    if active is _NOT_LOADED:
        return _load()
    return active  # type: ignore[no-any-return]


def available() -> bool:
    """Whether ``opentelemetry`` is importable (events are recorded)."""
    return _instruments() is not None


@contextmanager
def use_providers(meter_provider: Any = None, tracer_provider: Any = None) -> Iterator[None]:
    """Record to these providers instead of the global ones, until the block ends.

    For tests and the demo, which cannot replace the process-wide providers
    (OpenTelemetry allows setting them once).  Applications configure the
    global providers and never call this.  A provider left ``None`` is the
    global one.  Raises ``ImportError`` when opentelemetry is not installed.
    """
    global _active
    instruments = _Instruments(meter_provider, tracer_provider)
    with _lock:
        previous = _active
        _active = instruments
    try:
        yield
    finally:
        with _lock:
            _active = previous


# -- errors ------------------------------------------------------------------------


def error_type(exc: BaseException) -> str:
    """A low-cardinality ``error.type`` for ``exc`` (no message, no secret).

    A :class:`~deepsec.TokenAcquisitionError` gives its provider or deepsec
    error code when that code is a known one (``invalid_client``,
    ``timeout``...); every other exception gives its class name.
    """
    if isinstance(exc, TokenAcquisitionError) and exc.error in _KNOWN_ERRORS:
        return exc.error
    return type(exc).__name__


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


# -- contexts ----------------------------------------------------------------------


_ACTION_ATTRS: Final = {a: {ATTR_CONTEXT_ACTION: a} for a in CONTEXT_ACTIONS}


def record_context_change(previous: EndUserContext | None, current: EndUserContext | None) -> None:
    """Count a connection's context going from ``previous`` to ``current``.

    ``None`` is "no end-user context".  None to a context is ``set``, a
    context to another (unequal) one ``switch``, a context to None
    ``clear``; an equal context attached again (a refreshed token) is no
    change.  Called only where the hook touches a connection, never on its
    hot path.
    """
    inst = _active  # (_instruments(), inline: a pool's every request attaches)
    if inst is _NOT_LOADED:
        inst = _load()
    if inst is None:
        return
    if current is None:
        if previous is None:
            return
        action = "clear"
    elif previous is None:
        action = "set"
    elif previous == current:
        return
    else:
        action = "switch"
    inst.context_changes.add(1, _ACTION_ATTRS[action])


# -- rejected requests ---------------------------------------------------------------


def record_rejection(rejection: Rejection) -> None:
    """Count a request an adapter answered itself, by status and ``rejection.reason``.

    Called once, from :func:`deepsec.lifecycle.rejected`, the path every
    refused request takes.
    """
    inst = _instruments()
    if inst is None:
        return
    inst.rejected.add(
        1, {ATTR_HTTP_STATUS: int(rejection.status), ATTR_REJECTION_REASON: rejection.reason}
    )


# -- the end user on the server span (opt-in) ----------------------------------------

#: Key used when ``record_end_user=True``: pseudonyms correlate within this
#: process only.  Give a key (a string of 16+ characters) to correlate across
#: processes.
_PROCESS_KEY = os.urandom(32)


def end_user_pseudonym(identity: object, key: str | bytes | bool = True) -> str | None:
    """A keyed hash (HMAC-SHA256, 32 hex digits) of the end user, or None for no user.

    A token identity is hashed whole, a ``(name, key)`` local user by its
    name and key (the key is what the database checks).  Without the HMAC
    key the value cannot be linked back to the user.
    Why not the token's issuer and subject claims (stable across sign-ins):
    the pseudonym is set when the request starts, before anything verified
    the token, so a forged unsigned token with a victim's claims would carry
    the victim's pseudonym into the traces.  A whole token, signature
    included, cannot be forged.
    """
    if identity is None:
        return None
    if isinstance(identity, tuple):
        subject = f"local\x00{identity[0]}\x00{identity[1]}"
    elif isinstance(identity, str):
        subject = f"token\x00{identity}"
    else:
        subject = repr(identity)
    if key is True:
        secret = _PROCESS_KEY
    elif isinstance(key, str):
        secret = key.encode()
    elif isinstance(key, bytes):
        secret = key
    else:
        return None
    return hmac.new(secret, subject.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[
        :32
    ]


def record_end_user(setting: str | bytes | bool, context: EndUserContext | None) -> None:
    """Put the end user's pseudonym on the current (server) span, if opted in.

    ``setting`` is the adapters' ``record_end_user``: ``False`` does nothing,
    ``True`` uses a per-process key, a string is the key.
    """
    if not setting or context is None or context.identity is None:
        return
    inst = _instruments()
    if inst is None:
        return
    span = inst.get_current_span()
    if not span.is_recording():
        return
    pseudonym = end_user_pseudonym(context.identity, setting)
    if pseudonym is not None:
        span.set_attribute(ATTR_END_USER, pseudonym)


# -- a short summary (the demo) -----------------------------------------------------


@contextmanager
def collect_summary() -> Iterator[Callable[[], str]]:
    """Record into an in-memory SDK reader for the block; yields ``summary()``.

    ``summary()`` describes tokens fetched vs served from cache and contexts
    set/switched/cleared.  Without the OpenTelemetry SDK it says so.
    """
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    except ImportError:
        yield (
            lambda: (
                "Metrics: not shown (install opentelemetry-sdk, e.g. the 'otel' extra "
                "plus opentelemetry-sdk, to see deepsec's OpenTelemetry metrics here)"
            )
        )
        return
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    final: list[tuple[str, dict[str, Any], float]] | None = None

    def summary() -> str:
        return _summarize(final if final is not None else metric_points(reader))

    try:
        with use_providers(meter_provider=provider):
            yield summary
    finally:
        final = metric_points(reader)  # what summary() shows after the block
        provider.shutdown()


def metric_points(reader: Any) -> list[tuple[str, dict[str, Any], float]]:
    """``(instrument, attributes, value)`` for every data point of ``reader``.

    A histogram point's value is its count.
    """
    data = reader.get_metrics_data()
    points: list[tuple[str, dict[str, Any], float]] = []
    if data is None:
        return points
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count
                    points.append((metric.name, dict(point.attributes or {}), float(value)))
    return points


def _summarize(points: list[tuple[str, dict[str, Any], float]]) -> str:
    def total(name: str, attr: str, value: str) -> int:
        return int(sum(v for n, a, v in points if n == name and a.get(attr) == value))

    fetched = total(TOKEN_REQUESTS, ATTR_TOKEN_SOURCE, "idp")
    l1 = total(TOKEN_REQUESTS, ATTR_TOKEN_SOURCE, "l1")
    l2 = total(TOKEN_REQUESTS, ATTR_TOKEN_SOURCE, "l2")
    failed = int(sum(v for n, a, v in points if n == TOKEN_REQUESTS and ATTR_ERROR_TYPE in a))
    calls = int(sum(v for n, _, v in points if n == TOKEN_FETCH_DURATION))
    changes = {a: total(CONTEXT_CHANGES, ATTR_CONTEXT_ACTION, a) for a in CONTEXT_ACTIONS}
    rejected = int(sum(v for n, _, v in points if n == REQUESTS_REJECTED))
    # Tokens fetched are provider calls (the fetch histogram): lookups with
    # source idp also count callers that waited on another caller's fetch.
    cached = f"{l1} from the in-process cache" + (f", {l2} from the shared cache" if l2 else "")
    return (
        "OpenTelemetry metrics recorded by deepsec during these requests:\n"
        f"  tokens fetched     : {calls} identity-provider call(s)\n"
        f"  token lookups      : {cached}, {fetched} waited for a fetch"
        f"{f' ({failed} failed)' if failed else ''}\n"
        f"  contexts           : {changes['set']} set, {changes['switch']} switched, "
        f"{changes['clear']} cleared\n"
        f"  rejected requests  : {rejected}"
    )
