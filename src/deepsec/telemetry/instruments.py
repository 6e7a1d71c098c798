"""The instruments events are recorded with, loaded lazily, and the context-change event.

``opentelemetry`` is imported on the first event, not before: without it
nothing is imported and ``_active`` becomes ``None``.  Tests and the demo
swap in their own providers with :func:`use_providers`.  Code that swaps the
instruments (``bench/hook.py`` simulating an absent OpenTelemetry) must
write *this* module's ``_active``: the package does not re-export it, since
a copy would not be the one read.

Context changes are counted in :data:`context_changes`, a plain list, with
or without OpenTelemetry (:func:`record_context_change`): a pool attaches on
every request.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

from .names import (
    ATTR_CONTEXT_ACTION,
    CONTEXT_ACTIONS,
    CONTEXT_CHANGES,
    INSTRUMENTATION_NAME,
    REQUESTS_REJECTED,
    TOKEN_FETCH_DURATION,
    TOKEN_REQUESTS,
)

if TYPE_CHECKING:
    from ..context import EndUserContext


class _Instruments:
    """The instruments and tracer events are recorded with (one set at a time)."""

    __slots__ = (
        "changes",
        "error_code",
        "fetch_duration",
        "get_current_span",
        "internal_kind",
        "owns_changes",
        "rejected",
        "status",
        "token_requests",
        "tracer",
    )

    def __init__(
        self, meter_provider: Any = None, tracer_provider: Any = None, *, from_now: bool = False
    ) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.metrics import Observation
        from opentelemetry.trace import SpanKind, Status, StatusCode

        from .. import __version__

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
        # Counted in context_changes and reported at each collection by an
        # observable counter: one observer per meter provider, which reports
        # what happened while that provider recorded (see _ChangeObserver).
        provider = meter_provider or metrics.get_meter_provider()
        with _observers_lock:
            observer = _observers.get(provider)
            if observer is None:
                observer = _ChangeObserver(Observation)
                meter.create_observable_counter(
                    CONTEXT_CHANGES,
                    callbacks=[observer],
                    unit="{change}",
                    description="End-user security contexts set, switched or cleared on "
                    "connections",
                )
                with contextlib.suppress(TypeError):  # a provider not weakly referable
                    _observers[provider] = observer
            #: Whether these instruments started the observer (and end it).
            self.owns_changes = observer.start(from_now=from_now)
        self.changes = observer
        self.rejected = meter.create_counter(
            REQUESTS_REJECTED,
            unit="{request}",
            description="Requests the web adapters answered themselves instead of the app",
        )
        self.get_current_span = trace.get_current_span
        self.internal_kind = SpanKind.INTERNAL
        self.status: Any = Status
        self.error_code: Any = StatusCode.ERROR


# The package's name (what docs/logging.md lists), not this module's.
log = logging.getLogger("deepsec.telemetry")
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
    instruments = _Instruments(meter_provider, tracer_provider, from_now=True)
    with _lock:
        previous = _active
        _active = instruments
    try:
        yield
    finally:
        with _lock:
            _active = previous
        if instruments.owns_changes:  # (not the global provider's, nor an outer block's)
            with _observers_lock:
                instruments.changes.stop()  # later changes are not this provider's


# -- contexts ----------------------------------------------------------------------


class _ChangeObserver:
    """``deepsec.context.changes`` for one meter provider: the SDK's callback.

    Reports the changes made while the provider recorded, as a synchronous
    counter would have counted them: the global provider from the start of
    the process, a ``use_providers`` block's from its start to its end (and
    again from the start of a later block on the same provider, added on).
    One per provider: the SDK keeps the first callback registered under a
    name and ignores later ones.
    """

    __slots__ = ("done", "observation", "since")

    def __init__(self, observation: Any) -> None:
        self.observation = observation
        #: Counts of the provider's earlier blocks, ended.
        self.done = [0] * len(_ACTIONS)
        #: ``context_changes`` when the current block started; None: none is running.
        self.since: list[int] | None = None

    def start(self, *, from_now: bool) -> bool:
        """Start recording unless it already does; whether this call started it."""
        if self.since is not None:
            return False
        self.since = list(context_changes) if from_now else [0] * len(_ACTIONS)
        return True

    def stop(self) -> None:
        if self.since is not None:
            self.done = self._counts()
            self.since = None

    def _counts(self) -> list[int]:
        """The changes this provider recorded so far, by action."""
        since = self.since
        if since is None:
            return list(self.done)
        return [d + n - s for d, n, s in zip(self.done, context_changes, since, strict=True)]

    def __call__(self, options: Any) -> list[Any]:
        counts = self._counts()
        return [
            self.observation(n, _ACTION_ATTRS[a])
            for a, n in zip(_ACTIONS, counts, strict=True)
            if n
        ]


#: The observer registered with each meter provider (weakly: a test's
#: provider goes with the test).
_observers: weakref.WeakKeyDictionary[Any, _ChangeObserver] = weakref.WeakKeyDictionary()
_observers_lock = threading.Lock()


_ACTION_ATTRS: Final = {a: {ATTR_CONTEXT_ACTION: a} for a in CONTEXT_ACTIONS}
_ACTIONS: Final = ("set", "switch", "clear")  # the order of context_changes
_SET, _SWITCH, _CLEAR = range(3)

#: Context changes made in this process, by action (``_ACTIONS`` order),
#: whether or not OpenTelemetry is installed: reported by the
#: ``deepsec.context.changes`` observable counter.  A plain list because a
#: pool attaches on every request, and a synchronous counter's ``add()``
#: would cost every request the SDK's bookkeeping.  No lock (it would cost more than
#: the event): under the GIL ``context_changes[i] += 1`` is not interrupted;
#: on a free-threaded build a rare concurrent change could go uncounted,
#: which a metric can afford.
context_changes: Final[list[int]] = [0, 0, 0]


def record_context_change(previous: EndUserContext | None, current: EndUserContext | None) -> None:
    """Count a connection's context going from ``previous`` to ``current``.

    ``None`` is "no end-user context".  None to a context is ``set``, a
    context to another (unequal) one ``switch``, a context to None
    ``clear``; an equal context attached again (a refreshed token) is no
    change.  Called only where the hook touches a connection, never on its
    hot path.
    """
    if current is None:
        if previous is not None:
            context_changes[_CLEAR] += 1
    elif previous is None:
        context_changes[_SET] += 1
    elif previous != current:  # (an equal context again is a refreshed token)
        context_changes[_SWITCH] += 1
