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
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import oracledb

from . import telemetry
from .config import EndUserSecConfig, parse_end_user_sec_params
from .context import EndUserContext, current_context
from .errors import (
    USER_TOKEN_REJECTED,
    ConfigError,
    DeepSecError,
    IdentityError,
    IdentityNotAccepted,
    TokenAcquisitionError,
    TokenNotReadyError,
)
from .tokens import TokenSource, token_source_for
from .tokens.cache import jwt_expiry

__all__ = ["install", "installed", "params_hook", "prepare", "uninstall"]

log = logging.getLogger("deepsec")

REFERENCE_PLUGIN = "oracledb.plugins.end_user_sec_provider"
# Round trips that read nothing and must always be able to run (see _sync).
_HOUSEKEEPING = frozenset({"rollback", "logoff"})
# ORA-52602: the database rejected the database-access token.
_BAD_ACCESS_TOKEN = 52602


@dataclass(frozen=True, slots=True)
class _Attached:
    """What this library last attached to one connection."""

    context: EndUserContext | None  # None: known to be cleared
    token: str | None
    #: Until this time.monotonic() value, the same context object needs no token
    #: lookup: its token was valid when attached and is not near expiry.
    recheck_at: float = 0.0
    completion: Callable[[Any], None] | None = None


_UNKNOWN = _Attached(None, "<unknown>")
_CLEARED = _Attached(None, None)
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

    __slots__ = ("config", "user_on_connect", "user_round_trip")

    def __init__(
        self,
        config: EndUserSecConfig,
        user_on_connect: Callable[..., Any] | None,
        user_round_trip: Callable[..., Any] | None,
    ) -> None:
        self.config = config
        self.user_on_connect = user_on_connect
        self.user_round_trip = user_round_trip

    @property
    def source(self) -> TokenSource:
        """The process-wide token source of this config.

        Looked up rather than kept, so that
        :func:`deepsec.tokens.clear_token_sources` (credential rotation)
        reaches pools and connections that already exist; and the config is
        (re-)registered for :func:`prepare`.
        """
        _configs_in_use.setdefault(self.config.fingerprint, self.config)
        return token_source_for(self.config)

    # -- on connect / acquire ------------------------------------------------

    def on_connect_callback(self, conn: Any) -> Awaitable[None] | None:
        """Bind the per-round-trip callback; for asyncio, fetch the token first."""
        if isinstance(conn, oracledb.AsyncConnection):
            return self._on_connect_async(conn)
        self._bind(conn, self.user_round_trip)
        if self.user_on_connect is not None:
            self.user_on_connect(conn)
            self._rebind_if_replaced(conn)
        return None

    def _bind(self, conn: Any, theirs: Callable[..., Any] | None) -> None:
        conn.round_trip_callback = _ConnectionBinding(self, conn, theirs).round_trip

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
                _remember_failure(self.config, ctx, exc)
        if self.user_on_connect is not None:
            result = self.user_on_connect(conn)
            if inspect.isawaitable(result):
                await result
            self._rebind_if_replaced(conn)


class _ConnectionBinding:
    """deepsec's state for one Connection object: what is attached to it.

    Holds the connection weakly: a pool reuses the driver-level connection
    under a new Connection object after release, and the callback bound to
    the old object must then do nothing (the driver cleared the context on
    release).
    """

    __slots__ = ("attached", "binding", "conn_ref", "user_round_trip")

    def __init__(
        self, binding: _Binding, conn: Any, user_round_trip: Callable[..., Any] | None
    ) -> None:
        self.binding = binding
        self.conn_ref = weakref.ref(conn)
        self.attached = _UNKNOWN
        #: The app's own round-trip callback, called after ours.
        self.user_round_trip = user_round_trip

    def round_trip(self, name: str) -> Any:
        """Attach, switch or clear the end-user context before one round trip."""
        completion = None
        conn = self.conn_ref()
        if conn is not None:
            try:
                completion = self._sync(conn, current_context(), name)
            except oracledb.InterfaceError:
                # This Connection object was released to its pool or closed
                # (DPY-1001): the round trip belongs to the pool, not to us.
                completion = None
        user = self.user_round_trip
        if user is not None:
            user_completion = user(name)
            if completion is None:
                return user_completion
            if user_completion is not None:
                return _both(completion, user_completion)
        return completion

    def _sync(self, conn: Any, ctx: EndUserContext, name: str) -> Callable[[Any], None] | None:
        state = self.attached
        if ctx is state.context and time.monotonic() < state.recheck_at:
            return state.completion  # the hot path: same request, same connection
        if ctx.identity is None:
            if state is not _CLEARED:
                conn.clear_end_user_security_context()
                self.attached = _CLEARED
                telemetry.record_context_change(state.context, None)
                log.debug("cleared end-user context on connection %x", id(conn))
            return None
        source = self.binding.source
        token = source.cached_token(ctx)
        completion: Callable[[Any], None] | None
        if token is None or state.token != token or state.context != ctx:
            # Raises InterfaceError on a Connection object already released to
            # its pool: checked first, so no token is fetched for it.
            version = conn.version
            if token is None and name in _HOUSEKEEPING:
                # No token at hand (and none fetched for this): a rollback or
                # logoff reads nothing, and failing it would strand the
                # connection (a pool could not reset or close it).  It goes
                # out with no end-user context rather than not at all.
                if state is not _CLEARED:
                    conn.clear_end_user_security_context()
                    self.attached = _CLEARED
                    telemetry.record_context_change(state.context, None)
                return None
            if token is None:
                if isinstance(conn, oracledb.AsyncConnection):
                    failure = _recalled_failure(self.binding.config, ctx)
                    if failure is not None:  # prepare() or on-connect could not get it
                        raise failure
                    raise TokenNotReadyError(
                        "no database-access token is cached for the current end user; in "
                        "asyncio code use `async with deepsec.end_user(...)`, `await "
                        "deepsec.prepare()` or the ASGI/FastAPI adapter, which fetch it off "
                        "the event loop"
                    )
                token = source.get_token(ctx)
            security_context = build_security_context(self.binding.config, ctx, token, version)
            conn.set_end_user_security_context(security_context)
            telemetry.record_context_change(state.context, ctx)
            log.debug("attached end-user context %r on connection %x", ctx, id(conn))
            completion = self._completion(ctx)
        else:
            completion = state.completion
        self.attached = _Attached(ctx, token, _recheck_at(token), completion)
        return completion

    def _completion(self, ctx: EndUserContext) -> Callable[[Any], None]:
        def completion(outcome: Any) -> None:
            # The database rejected the access token (revoked, or expired early):
            # drop it so the next round trip attaches a freshly fetched one.
            if isinstance(outcome, oracledb.DatabaseError):
                err = outcome.args[0] if outcome.args else None
                if getattr(err, "code", None) == _BAD_ACCESS_TOKEN:
                    self.binding.source.invalidate(ctx)
                    self.attached = _UNKNOWN

        return completion


def _recheck_at(token: str) -> float:
    now = time.monotonic()
    exp = jwt_expiry(token)
    if exp is None:
        return now + _RECHECK_INTERVAL
    left = exp - time.time() - _EXPIRY_MARGIN
    return now + max(0.0, min(_RECHECK_INTERVAL, left))


def _both(first: Callable[[Any], Any], second: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def completion(outcome: Any) -> Any:
        first(outcome)
        return second(outcome)

    return completion


def _version_tuple(version: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in (version or "").split("."))[:3]
    except ValueError:
        return ()


def build_security_context(
    config: EndUserSecConfig,
    ctx: EndUserContext,
    token: str,
    server_version: str | None = None,
) -> Any:
    """Build the driver's ``EndUserSecurityContext`` for ``ctx``.

    Data roles and attributes set on the context win over configured ones.
    With ``on_behalf_of`` against a 23.26.4+ database the OBO token alone
    identifies the user, as python-oracledb's plugin does.
    """
    data_roles = ctx.data_roles if ctx.data_roles is not None else config.data_roles
    attributes = ctx.attributes if ctx.attributes is not None else config.attributes
    if ctx.is_local_user and data_roles:
        raise IdentityError(
            "data roles cannot be set explicitly for a local (name, key) end user "
            "(they come from end_user_sec_params['data_roles'] here); remove them "
            "or use a token identity"
        )
    identity = ctx.identity
    if config.auth_flow == "on_behalf_of" and _version_tuple(server_version) >= (23, 26, 4):
        identity = None
    return oracledb.create_end_user_security_context(
        token,
        end_user_identity=identity,
        data_roles=list(data_roles) if data_roles is not None else None,
        attributes=dict(attributes) if attributes is not None else None,
    )


# -- the params hook -----------------------------------------------------------


def _is_ours(callback: object) -> bool:
    return isinstance(getattr(callback, "__self__", None), _Binding)


def params_hook(params: oracledb.ConnectParams) -> None:
    """python-oracledb params hook: install deepsec's callbacks where configured.

    Runs on a copy of the params before every standalone connect and pool
    creation.  Params without ``end_user_sec_params`` are left untouched.

    Raises:
        ConfigError: ``end_user_sec_params`` are invalid (every problem listed),
            or python-oracledb is in Thick mode.
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
    if _is_ours(params.on_connect_callback):  # the hook ran twice on these params
        return
    token_source_for(config)  # build it now: a bad source fails the connect, not a query
    _configs_in_use.setdefault(config.fingerprint, config)
    binding = _Binding(config, params.on_connect_callback, params.round_trip_callback)
    params.set(on_connect_callback=binding.on_connect_callback)


# Every config a connection or pool was made with in this process: what
# prepare() fetches tokens for.  (Kept by value: tracking pools' lifetimes would
# depend on when the garbage collector frees a closed pool.)
_configs_in_use: dict[str, EndUserSecConfig] = {}
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


# Token failures met while fetching ahead of time (prepare(), async on-connect),
# per (config, context object): the asyncio round trip that needed the token
# raises the real error instead of TokenNotReadyError.  Bounded.
_failures: dict[tuple[str, int], tuple[EndUserContext, DeepSecError]] = {}
_FAILURES_KEPT = 256


def _remember_failure(config: EndUserSecConfig, ctx: EndUserContext, exc: DeepSecError) -> None:
    if len(_failures) >= _FAILURES_KEPT:
        _failures.clear()
    _failures[(config.fingerprint, id(ctx))] = (ctx, exc)


def _recalled_failure(config: EndUserSecConfig, ctx: EndUserContext) -> DeepSecError | None:
    entry = _failures.get((config.fingerprint, id(ctx)))
    return entry[1] if entry is not None and entry[0] is ctx else None


def forget_prefetch_configs() -> None:
    """Forget which configs :func:`prepare` fetches for (test isolation).

    Connections and pools still open register theirs again on their next
    acquire or token lookup.
    """
    _configs_in_use.clear()


async def prepare(context: EndUserContext | None = None) -> None:
    """Fetch, off the event loop, the tokens the current end user will need.

    asyncio connections never fetch tokens inside an operation (that would
    block the loop); ``async with deepsec.end_user(...)`` and the ASGI/FastAPI
    adapters call this so the per-round-trip callback finds them cached.  It
    covers the token source of every ``end_user_sec_params`` connected with so
    far in this process.

    An app may connect to several databases and a request use only some of
    them, so a source that fails does not fail the request here: its error is
    kept, and the first asyncio round trip that needs that token raises it
    (fail closed, at the statement).  Only when *every* source failed -- the
    usual single-database case -- is an error raised now, so adapters can
    answer before the app runs: a provider failure first
    (:class:`~deepsec.TokenAcquisitionError`, a 503), else the end user's
    rejection (:class:`~deepsec.IdentityNotAccepted` or a refused user token,
    a 401).

    Raises:
        TokenAcquisitionError, IdentityNotAccepted: no source could serve
            this end user.
    """
    ctx = context if context is not None else current_context()
    if ctx.identity is None:
        return
    configs = list(_configs_in_use.values())
    missing = [c for c in configs if token_source_for(c).cached_token(ctx) is None]
    if not missing:
        return
    results = await asyncio.gather(
        *(token_source_for(c).get_token_async(ctx) for c in missing), return_exceptions=True
    )
    failures: list[DeepSecError] = []
    for config, result in zip(missing, results, strict=True):
        if isinstance(result, DeepSecError):
            _remember_failure(config, ctx, result)
            failures.append(result)
        elif isinstance(result, BaseException):
            raise result
        else:
            _failures.pop((config.fingerprint, id(ctx)), None)
    if failures and len(failures) == len(configs):
        raise next((f for f in failures if not _rejects_the_user(f)), failures[0])


def _rejects_the_user(exc: DeepSecError) -> bool:
    """Whether ``exc`` is about this end user, not about the provider or app."""
    if isinstance(exc, IdentityNotAccepted):
        return True
    return isinstance(exc, TokenAcquisitionError) and exc.error in USER_TOKEN_REJECTED
