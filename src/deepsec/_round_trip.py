"""The per-round-trip callback: one Connection object's end-user context.

:mod:`deepsec.hook` binds a :class:`ConnectionBinding` to every Connection
object (on connect and on every pool acquire); python-oracledb calls its
:meth:`~ConnectionBinding.round_trip` before each round trip, inside the
connection's lock and in the thread or task that issued it.  It attaches,
switches or clears the end-user security context so that the round trip
carries exactly the current end user (see :mod:`deepsec.hook` for how it is bound).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import oracledb

from ._contexts import Prepared, build_from_parts, keep_prepared, prepared_key, revoke_prepared
from ._contexts import prepared as _prepared
from .config import EndUserSecConfig
from .context import _EMPTY as _NO_CONTEXT
from .context import APPLICATION, EndUserContext, _current_activation
from .errors import NoEndUserError, TokenNotReadyError
from .prefetch import recalled_failure
from .telemetry.instruments import record_context_change
from .tokens import TokenSource, token_source_for
from .tokens.cache import jwt_expiry

if TYPE_CHECKING:
    from .hook import _Binding

__all__ = ["ConnectionBinding", "bind_connection", "round_trip_failed"]

# Looked up once: these run on every acquire and round trip.
_monotonic = time.monotonic
_weakref = weakref.ref
_DEBUG = logging.DEBUG

log = logging.getLogger("deepsec")

# Housekeeping round trips: they carry no statement and must always be able to
# run, neither refused by strict mode nor failed for want of a cached token
# (refusing them would strand connections: a pool pings, resets and closes its
# own, and an app must be able to commit).  The names are the driver's
# round-trip callback names (python-oracledb 26.1).
_HOUSEKEEPING = frozenset({"ping", "commit", "rollback", "logoff", "session_release"})
_NEVER_REFUSED = _HOUSEKEEPING
# ORA-52602: the database rejected the database-access token.
_BAD_ACCESS_TOKEN = 52602


# How long the same context object skips the token-cache lookup.  Bounds how
# long a connection keeps a token after TokenSource.invalidate()/cache clear.
_RECHECK_INTERVAL = 1.0
# Never reuse a token this close to its expiry without asking the cache.
_EXPIRY_MARGIN = 30.0


class ConnectionBinding:
    """deepsec's state for one Connection object: what is attached to it.

    Holds the connection weakly: a pool reuses the driver-level connection
    under a new Connection object after release, and the callback bound to
    the old object must then do nothing (the driver cleared the context on
    release).  Its fields change only in :meth:`round_trip`, which the driver
    runs inside the connection's lock.
    """

    __slots__ = ("binding", "cleared", "conn_ref", "context", "prepared", "user_round_trip")

    binding: _Binding
    conn_ref: weakref.ref[Any]
    #: The context last attached (``None``: none, or not known).
    context: EndUserContext | None
    #: The very object attached: another one for the same context means
    #: another token or built context (compared with ``is``, never ``==``:
    #: equal contexts are not always the same context, e.g. True == 1).
    #: Until its ``check_until`` the same context object needs no token
    #: lookup; a rejected token sets that to 0 for every connection at once.
    prepared: Prepared | None
    #: Whether this library cleared the context (else it is not known).
    cleared: bool
    #: The app's own round-trip callback, called after ours.
    user_round_trip: Callable[..., Any] | None

    def round_trip(self, name: str) -> Any:
        """Attach, switch or clear the end-user context before one round trip.

        Returns the round trip's completion: the attached :class:`Prepared`
        (which watches for a rejected token), or ``None``.
        """
        completion = None
        # (Read into a local, then called: CPython 3.11 does not specialize
        # calling a slot's value as a method, self.conn_ref().)
        conn_ref = self.conn_ref
        conn = conn_ref()
        if conn is not None:
            activation = _current_activation()  # (current_context(), inlined: every round trip)
            ctx = activation.context if activation.active else _NO_CONTEXT
            prepared = self.prepared
            try:
                if (
                    ctx is self.context
                    and prepared is not None
                    and _monotonic() < prepared.check_until
                ):
                    completion = prepared  # the hot path: same request, same connection
                else:
                    completion = self._sync(conn, ctx, name)
            except oracledb.InterfaceError as exc:
                # This Connection object was released to its pool or closed
                # (DPY-1001): the round trip belongs to the pool, not to us.
                # Any other interface error fails the round trip: letting it go
                # out would run it with whatever context is attached.
                if not _is_not_connected(exc):
                    raise
                completion = None
        user = self.user_round_trip
        if user is not None:
            user_completion = user(name)
            if completion is None:
                return user_completion
            if user_completion is not None:
                return _both(completion, user_completion)
        return completion

    def _sync(self, conn: Any, ctx: EndUserContext, name: str) -> Prepared | None:
        """Attach, switch or clear: the context differs from the one attached."""
        config = self.binding.config
        if ctx._identity is None:  # (the slot: one call less per request)
            if config.require_end_user and ctx is not APPLICATION and name not in _NEVER_REFUSED:
                _verify_connected(conn)  # a released Connection's round trip is the pool's
                # Raised from the round-trip callback: the driver sends nothing.
                raise NoEndUserError(
                    "strict mode (end_user_sec_params['require_end_user']) refused a "
                    f"{name!r} round trip with no current end user; run application-level "
                    "work inside `with deepsec.as_application():`"
                )
            self._clear(conn)
            return None
        index = self.binding.by_identity
        if index is not None and ctx._data_roles is None and ctx._attributes is None:
            prepared = index.get(ctx._identity)  # (the entry prepared_key would find)
        else:
            prepared = None
        if prepared is None or _monotonic() >= prepared.check_until:
            key = prepared_key(config, ctx, conn)
            prepared = _prepared.get(key)
            if prepared is None or _monotonic() >= prepared.check_until:
                prepared = self._prepare(conn, ctx, name, key, prepared)
                if prepared is None:  # housekeeping with no token at hand: goes out cleared
                    self._clear(conn)
                    return None
        if self.prepared is not prepared:
            # (Identity, not equality: one Prepared per key and token, and the
            # key tells apart what == does not, e.g. attributes True and 1.)
            conn.set_end_user_security_context(prepared.context)
            # (A fresh token for the same context object, after a rejection,
            # is no context change: record_context_change compares.)
            record_context_change(self.context, ctx)
            if log.isEnabledFor(_DEBUG):
                log.debug("attached end-user context %r on connection %x", ctx, id(conn))
            self.prepared = prepared
            self.cleared = False
        self.context = ctx
        return prepared

    def _clear(self, conn: Any) -> None:
        """Leave no end-user context on the connection (once: then it is known)."""
        if not self.cleared:
            conn.clear_end_user_security_context()
            record_context_change(self.context, None)
            self.context = self.prepared = None
            self.cleared = True
            log.debug("cleared end-user context on connection %x", id(conn))

    def _prepare(
        self,
        conn: Any,
        ctx: EndUserContext,
        name: str,
        key: tuple[Any, ...],
        previous: Prepared | None,
    ) -> Prepared | None:
        """Ask the token source for the token; build (or keep) the security context.

        Runs at most about once a second per (config, end user): in between,
        :data:`_prepared` answers without hashing the identity again.
        """
        binding = self.binding
        config = binding.config
        source = binding.source
        entry = _cached_entry(source, ctx)
        if entry is None:
            # Raises InterfaceError on a Connection object already released to
            # its pool: checked first, so no token is fetched for it.
            _verify_connected(conn)
            if name in _HOUSEKEEPING:
                # No token at hand (and none fetched for this): a rollback or
                # logoff reads nothing, and failing it would strand the
                # connection (a pool could not reset or close it).  It goes
                # out with no end-user context rather than not at all.
                return None
            if isinstance(conn, oracledb.AsyncConnection):
                failure = recalled_failure(config, ctx)
                if failure is not None:  # prepare() or on-connect could not get it
                    raise failure
                raise TokenNotReadyError(
                    "no database-access token is cached for the current end user; in "
                    "asyncio code use `async with deepsec.end_user(...)`, `await "
                    "deepsec.prepare()` or the ASGI/FastAPI adapter, which fetch it off "
                    "the event loop"
                )
            token = source.get_token(ctx)
            entry = _cached_entry(source, ctx, record=False)  # get_token counted it
            usable_until = entry[1] if entry is not None and entry[0] == token else 0.0
        else:
            token, usable_until = entry
        if previous is not None and previous.token == token and not previous.revoked:
            # Same token, same inputs: the same object, so that connections
            # holding it need not attach again.
            previous.check_until = _recheck_at(usable_until)
            if previous.revoked:  # rejected meanwhile: undo, so no holder keeps it
                previous.check_until = 0.0
            prepared = previous
        else:
            built = build_from_parts(config, ctx, token, key[-1])
            prepared = Prepared(
                token, built, _recheck_at(usable_until), key, ctx, binding.on_round_trip_error
            )
        keep_prepared(key, prepared)
        return prepared


def bind_connection(
    binding: _Binding, conn: Any, user_round_trip: Callable[..., Any] | None
) -> ConnectionBinding:
    """The state for a new Connection object (made on every pool acquire).

    A module function, not ``__init__`` (a class call runs a Python
    ``__init__`` from C, about a third more) nor a classmethod (CPython 3.11
    does not specialize reading an attribute of a class): on every acquire.
    The class has no ``__init__``: calling it is C only.
    """
    self = ConnectionBinding()
    self.binding = binding
    self.conn_ref = _weakref(conn)
    self.context = None
    self.prepared = None
    self.cleared = False
    self.user_round_trip = user_round_trip
    return self


def round_trip_failed(config: EndUserSecConfig, prepared: Prepared, error: BaseException) -> None:
    """A round trip made with ``prepared`` attached failed with ``error``.

    When the database rejected the access token (revoked, or expired early),
    drop *that* token, so the next round trip of every connection holding it
    attaches a fresh one.  Compare-and-drop: a token another connection
    fetched since is kept (dropping it would cost one fetch per rejected
    connection and, with the shared cache, mark a good token rejected
    fleet-wide).
    """
    if isinstance(error, oracledb.DatabaseError):
        err = error.args[0] if error.args else None
        if getattr(err, "code", None) == _BAD_ACCESS_TOKEN:
            token_source_for(config).invalidate(prepared.ctx, token=prepared.token)
            revoke_prepared(prepared.key, prepared)


def _is_not_connected(exc: oracledb.InterfaceError) -> bool:
    """Whether ``exc`` is DPY-1001: the Connection object is released or closed."""
    err = exc.args[0] if exc.args else None
    return getattr(err, "full_code", None) == "DPY-1001"


def _verify_connected(conn: Any) -> None:
    """Raise InterfaceError (DPY-1001) for a Connection object released or closed."""
    conn.version  # noqa: B018  (the property checks the connection first)


def _cached_entry(
    source: TokenSource, ctx: EndUserContext, record: bool = True
) -> tuple[str, float] | None:
    """The cached token and until when it is served (epoch seconds), or ``None``.

    The built-in sources keep the token's usable life with it; for any other
    source it is read from the token (a JWT's ``exp``, less a margin).
    ``record=False`` (built-in sources): a re-read, not a lookup to count.
    """
    cached_entry = getattr(source, "cached_entry", None)
    if cached_entry is not None:
        entry: tuple[str, float] | None = (
            cached_entry(ctx) if record else cached_entry(ctx, record=False)
        )
        return entry
    token = source.cached_token(ctx)
    if token is None:
        return None
    exp = jwt_expiry(token)
    return token, (time.time() + _RECHECK_INTERVAL if exp is None else exp - _EXPIRY_MARGIN)


def _recheck_at(usable_until: float) -> float:
    """Until when (monotonic) an attached token needs no new cache lookup."""
    left = usable_until - time.time()
    return time.monotonic() + max(0.0, min(_RECHECK_INTERVAL, left))


def _both(first: Callable[[Any], Any], second: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def completion(outcome: Any) -> Any:
        first(outcome)
        return second(outcome)

    return completion
