"""The python-oracledb params hook: every operation runs as the current end user.

``import deepsec`` registers :func:`params_hook` once with
``oracledb.register_params_hook``.  For connect or pool parameters whose
``extra_auth_params`` hold ``end_user_sec_params`` it installs, *chained* with
any callbacks the application set itself:

an ``on_connect_callback`` (run after a standalone connect and on every
pool acquire) that binds a ``round_trip_callback`` to the connection.  The
driver runs that before every round trip, inside the connection's lock and in
the thread or task that issued it.  It compares the current
:class:`~deepsec.EndUserContext` (a contextvar) with the one last attached to
*this* connection and sets a new security context when they differ, clears it
when there is no end user, and does nothing when they are the same.  The
driver piggybacks the context on that very round trip, so attaching costs no
round trip; and because nothing depends on when a connection was opened or
acquired, pools, persistent connections and connections shared by threads or
tasks are all safe.  For asyncio connections the on-connect callback is also
where a missing token is fetched, off the event loop.

A pool hands out a new Connection object on every acquire, so the first round
trip of each request attaches again: built security contexts are therefore
shared between connections (:mod:`deepsec._contexts`), and the token's usable
life comes from the token cache with the token.  With
``require_end_user=True`` (strict mode) the same callback refuses a
statement that has no end user, before anything is sent.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import oracledb

from ._contexts import (
    Prepared,
    build_from_parts,
    build_security_context,
    forget_security_contexts,
    identity_index,
    keep_prepared,
    prepared_key,
    revoke_prepared,
)
from ._contexts import prepared as _prepared
from .config import EndUserSecConfig, parse_end_user_sec_params
from .context import _EMPTY as _NO_CONTEXT
from .context import APPLICATION, EndUserContext, _current, current_context
from .dsn import require_tcps
from .errors import (
    ConfigError,
    DeepSecError,
    NoEndUserError,
    TokenNotReadyError,
)
from .prefetch import (
    forget_prefetch_configs,
    prepare,
    recalled_failure,
    register_config,
    remember_failure,
)
from .telemetry.instruments import record_context_change
from .tokens import TokenSource, token_source_for
from .tokens.cache import jwt_expiry

# Looked up once: these run on every acquire and round trip.
_monotonic = time.monotonic
_weakref = weakref.ref
_new_binding = object.__new__
_AsyncConnection = oracledb.AsyncConnection
_DEBUG = logging.DEBUG

# forget_prefetch_configs and prepare live in deepsec.prefetch; they are
# importable from here as before.
__all__ = [
    "build_security_context",
    "forget_prefetch_configs",
    "forget_security_contexts",
    "install",
    "installed",
    "params_hook",
    "prepare",
    "uninstall",
]

log = logging.getLogger("deepsec")

REFERENCE_PLUGIN = "oracledb.plugins.end_user_sec_provider"
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


class _Binding:
    """The callbacks installed for one parsed config, chained with the app's own.

    One instance serves every connection made with the same params.  On
    connect (and on every pool acquire, which hands out a new Connection
    object) it binds a ``round_trip_callback`` to that connection: the driver
    calls it before each round trip, *inside* the connection's lock and in the
    thread or asyncio task that issued the round trip.  That is what makes the
    guarantee exact even when threads or tasks share one connection; an
    ``operation_callback`` runs before the lock is taken, and two users could
    swap contexts between callback and round trip.
    """

    __slots__ = (
        "by_identity",
        "config",
        "on_round_trip_error",
        "user_on_connect",
        "user_round_trip",
    )

    def __init__(
        self,
        config: EndUserSecConfig,
        user_on_connect: Callable[..., Any] | None,
        user_round_trip: Callable[..., Any] | None,
    ) -> None:
        self.config = config
        self.user_on_connect = user_on_connect
        self.user_round_trip = user_round_trip
        #: What the built contexts made for this config call when a round trip
        #: fails (holds the config only, not this binding and the app's callbacks).
        self.on_round_trip_error = functools.partial(_round_trip_failed, config)
        #: This config's plain prepared contexts by identity (None for
        #: on-behalf-of): the first round trip of each pooled request finds
        #: its user's without building the full key.
        self.by_identity = identity_index(config)

    @property
    def source(self) -> TokenSource:
        """The process-wide token source of this config.

        Looked up rather than kept, so that
        :func:`deepsec.tokens.clear_token_sources` (credential rotation)
        reaches pools and connections that already exist; and the config is
        (re-)registered for :func:`prepare`.
        """
        register_config(self.config)
        return token_source_for(self.config)

    # -- on connect / acquire ------------------------------------------------

    def on_connect_callback(self, conn: Any) -> Awaitable[None] | None:
        """Bind the per-round-trip callback; for asyncio, fetch the token first."""
        if isinstance(conn, _AsyncConnection):
            ctx = current_context()
            if self.user_on_connect is None and (
                ctx.identity is None or self._token_at_hand(conn, ctx)
            ):
                # Nothing to fetch: bind now and give the driver an awaitable
                # that is already done (a coroutine per acquire costs more).
                self._bind(conn, self.user_round_trip)
                return _DONE
            return self._on_connect_async(conn)
        binding = _ConnectionBinding.new(self, conn, self.user_round_trip)
        conn.round_trip_callback = binding.round_trip
        if self.user_on_connect is not None:
            self.user_on_connect(conn)
            self._rebind_if_replaced(conn)
        return None

    def _token_at_hand(self, conn: Any, ctx: EndUserContext) -> bool:
        prepared = _prepared.get(prepared_key(self.config, ctx, conn))
        if prepared is not None and time.monotonic() < prepared.check_until:
            return True
        return self.source.cached_token(ctx) is not None

    def _bind(self, conn: Any, theirs: Callable[..., Any] | None) -> None:
        # (A pool resets the driver connection's round_trip_callback to the
        # pool's own on every acquire, so there is no binding to reuse.)
        conn.round_trip_callback = _ConnectionBinding.new(self, conn, theirs).round_trip

    def _rebind_if_replaced(self, conn: Any) -> None:
        # The app's on-connect callback may set its own round_trip_callback
        # (tracing, metrics): chain it, never let it silently replace ours.
        current = conn.round_trip_callback
        if not isinstance(getattr(current, "__self__", None), _ConnectionBinding):
            self._bind(conn, current)

    async def _on_connect_async(self, conn: Any) -> None:
        ctx = current_context()
        self._bind(conn, self.user_round_trip)
        if ctx.identity is not None:
            try:
                await self.source.get_token_async(ctx)
            except DeepSecError as exc:
                # Raising here would leave a pooled connection checked out
                # forever (the pool counts it busy); the first round trip made
                # for this context raises it instead, and the app's release of
                # the connection returns it to the pool as usual.
                remember_failure(self.config, ctx, exc)
        if self.user_on_connect is not None:
            result = self.user_on_connect(conn)
            if inspect.isawaitable(result):
                await result
            self._rebind_if_replaced(conn)


class _Done:
    """An awaitable that is already complete: awaiting it never suspends."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, Any, None]:
        return
        yield  # a generator that finishes at once


_DONE: Awaitable[None] = _Done()


class _ConnectionBinding:
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

    @classmethod
    def new(
        cls, binding: _Binding, conn: Any, user_round_trip: Callable[..., Any] | None
    ) -> _ConnectionBinding:
        """The state for a new Connection object (made on every pool acquire).

        A classmethod, not ``__init__``: a class call runs a Python
        ``__init__`` from C, which costs about a third more than this plain
        method call, on every acquire.
        """
        self = _new_binding(cls)
        self.binding = binding
        self.conn_ref = _weakref(conn)
        self.context = None
        self.prepared = None
        self.cleared = False
        self.user_round_trip = user_round_trip
        return self

    def round_trip(self, name: str) -> Any:
        """Attach, switch or clear the end-user context before one round trip.

        Returns the round trip's completion: the attached :class:`Prepared`
        (which watches for a rejected token), or ``None``.
        """
        completion = None
        conn = self.conn_ref()
        if conn is not None:
            activation = _current.get()  # (current_context(), inlined: every round trip)
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


def _round_trip_failed(config: EndUserSecConfig, prepared: Prepared, error: BaseException) -> None:
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


# -- the params hook -----------------------------------------------------------


def _is_ours(callback: object) -> bool:
    return isinstance(getattr(callback, "__self__", None), _Binding)


def params_hook(params: oracledb.ConnectParams) -> None:
    """python-oracledb params hook: install deepsec's callbacks where configured.

    Runs on a copy of the params before every standalone connect and pool
    creation.  Params without ``end_user_sec_params`` are left untouched.

    Raises:
        ConfigError: ``end_user_sec_params`` are invalid (every problem listed),
            python-oracledb is in Thick mode, or an address is not TCPS.
    """
    extra = params.extra_auth_params
    if not extra or extra.get("end_user_sec_params") is None:
        return
    _neutralise_reference_plugin()
    config = parse_end_user_sec_params(extra["end_user_sec_params"])
    if not oracledb.is_thin_mode():
        # The round-trip callback deepsec attaches with exists in Thin mode
        # only; in Thick mode every statement would silently run as the
        # application alone.  Fail closed, at connect time.
        raise ConfigError(
            "end_user_sec_params need python-oracledb Thin mode; "
            "oracledb.init_oracle_client() has switched this process to Thick mode"
        )
    # Over plain TCP the app would connect, serve anonymous statements and
    # fail at the first one with an end user (DPY-2073): refuse it now.
    require_tcps(params)
    if _is_ours(params.on_connect_callback):  # the hook ran twice on these params
        return
    token_source_for(config)  # build it now: a bad source fails the connect, not a query
    register_config(config)
    binding = _Binding(config, params.on_connect_callback, params.round_trip_callback)
    params.set(on_connect_callback=binding.on_connect_callback)


_install_lock = threading.Lock()
_warned_reference = False


def _registered_hooks() -> list[Callable[..., Any]]:
    # python-oracledb keeps the hooks in this list; there is no public getter.
    from oracledb import base_impl  # type: ignore[attr-defined]

    hooks: list[Callable[..., Any]] = base_impl.REGISTERED_PARAMS_HOOKS
    return hooks


def _neutralise_reference_plugin() -> None:
    """Unregister python-oracledb's own end-user plugin hook, with a warning.

    Both hooks would attach a context, and the reference one overwrites the
    application's ``on_connect_callback`` and reads a thread-local identity
    that leaks across asyncio tasks.  deepsec is a superset of its behaviour.
    """
    global _warned_reference
    for hook in list(_registered_hooks()):
        if getattr(hook, "__module__", None) == REFERENCE_PLUGIN:
            oracledb.unregister_params_hook(hook)
            if not _warned_reference:
                _warned_reference = True
                warnings.warn(
                    f"{REFERENCE_PLUGIN} is imported as well as deepsec; deepsec has "
                    "unregistered its params hook so that only one end-user context is "
                    "attached. Remove the import of the plugin.",
                    RuntimeWarning,
                    stacklevel=3,
                )


def install() -> None:
    """Register the params hook (idempotent; ``import deepsec`` calls it)."""
    with _install_lock:
        if params_hook not in _registered_hooks():
            oracledb.register_params_hook(params_hook)
        _neutralise_reference_plugin()


def uninstall() -> None:
    """Unregister the params hook.

    Connections and pools created before keep their callbacks; new ones are
    made without deepsec.
    """
    with _install_lock:
        while params_hook in _registered_hooks():
            oracledb.unregister_params_hook(params_hook)


def installed() -> bool:
    """True while the params hook is registered."""
    return params_hook in _registered_hooks()
