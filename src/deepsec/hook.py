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
statement that has no end user, before anything is sent.  The callback and
the per-connection state it keeps live in :mod:`deepsec._round_trip`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import oracledb

from ._contexts import (
    build_security_context,
    forget_security_contexts,
    identity_index,
    prepared_key,
)
from ._contexts import prepared as _prepared
from ._round_trip import ConnectionBinding, bind_connection, round_trip_failed
from .config import EndUserSecConfig, parse_end_user_sec_params
from .context import EndUserContext, current_context
from .dsn import require_tcps
from .errors import ConfigError, DeepSecError
from .prefetch import forget_prefetch_configs, prepare, register_config, remember_failure
from .tokens import TokenSource, token_source_for

# Looked up once: this runs on every acquire.
_AsyncConnection = oracledb.AsyncConnection
_Connection = oracledb.Connection

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
        self.on_round_trip_error = functools.partial(round_trip_failed, config)
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
        # (type() first: the common case without isinstance's subclass walk.)
        if type(conn) is not _Connection and isinstance(conn, _AsyncConnection):
            ctx = current_context()
            if self.user_on_connect is None and (
                ctx.identity is None or self._token_at_hand(conn, ctx)
            ):
                # Nothing to fetch: bind now and give the driver an awaitable
                # that is already done (a coroutine per acquire costs more).
                self._bind(conn, self.user_round_trip)
                return _DONE
            return self._on_connect_async(conn)
        binding = bind_connection(self, conn, self.user_round_trip)
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
        conn.round_trip_callback = bind_connection(self, conn, theirs).round_trip

    def _rebind_if_replaced(self, conn: Any) -> None:
        # The app's on-connect callback may set its own round_trip_callback
        # (tracing, metrics): chain it, never let it silently replace ours.
        current = conn.round_trip_callback
        if not isinstance(getattr(current, "__self__", None), ConnectionBinding):
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
