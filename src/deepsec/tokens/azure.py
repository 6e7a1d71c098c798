"""Entra ID (Azure AD) database-access tokens through MSAL.

:class:`AzureTokenSource` serves ``spi_type='azure_tokens'`` with either
``auth_flow``:

``client_credentials``
    The application's own token (``acquire_token_for_client``); one cache
    entry for every end user.
``on_behalf_of``
    A token for the end user, exchanged from the user's own access token
    (``acquire_token_on_behalf_of``).  MSAL never serves OBO results from its
    cache, so our :class:`~deepsec.tokens.cache.TokenCache` keys them per
    user (a sha256 of the user token, never the token) and drops them no later
    than the user token's own ``exp``.

Fixes over python-oracledb's ``azure_tokens`` plugin: one MSAL
``ConfidentialClientApplication`` per (authority, client id, credential,
transport settings and flow) for the life of the process, so MSAL's own
token cache is kept; single-flight misses; a real timeout; TLS trust that the
environment cannot change; typed errors that never carry a secret.

Client-credentials and OBO use **separate** MSAL applications, and the OBO
application stores nothing in MSAL's cache: an OBO reply without
``client_info`` would otherwise be stored without an account, and a later
``acquire_token_for_client`` for the same scope returned that *user's* token.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Literal

import msal

from ..errors import IdentityNotAccepted, TokenAcquisitionError
from ._http import (
    Deadline,
    TimeoutSession,
    deadline,
    error_from_exception,
    install_log_redaction,
    provider_error_fields,
    register_secret,
    scrub,
    timeout_error,
)
from ._lifetime import token_expiry
from .cache import FetchResult, KeyMemo, cache_key, jwt_expiry
from .shared import token_cache_for

if TYPE_CHECKING:
    from ..config import EndUserSecConfig
    from ..context import EndUserContext

__all__ = ["AzureTokenSource", "reset_msal_apps"]

logger = logging.getLogger("deepsec.tokens.azure")

Flow = Literal["client_credentials", "on_behalf_of"]

# MSAL's module loggers; the filter removes tokens from what they log.
install_log_redaction(
    [
        "msal",
        "msal.application",
        "msal.authority",
        "msal.token_cache",
        "msal.telemetry",
        "msal.throttled_http_client",
        "msal.oauth2cli.oauth2",
        "msal.oauth2cli.oidc",
        "msal.oauth2cli.assertion",
    ]
)


class _NoStoreTokenCache(msal.TokenCache):  # type: ignore[misc]
    """An MSAL token cache that keeps nothing (for the OBO application).

    MSAL never reads its cache for OBO, yet stores every reply (access,
    refresh and id tokens, accounts): unbounded growth, and the cross-user
    hazard described in the module docstring.  Our own cache keeps OBO tokens.
    """

    def add(self, event: Mapping[str, Any], **kwargs: Any) -> None:
        """Store nothing."""
        return None


class _NoStoreHttpCache(dict):  # type: ignore[type-arg]
    """MSAL's ``http_cache`` that keeps nothing: MSAL's own throttling is off.

    MSAL replays a 429/5xx answer for its ``Retry-After`` (up to an hour)
    under a key without the user for on-behalf-of requests, so one user's
    throttled answer blocked every user, new ones included, long after the
    provider recovered.  deepsec remembers failures itself, per cache key
    (one user, or the application's client-credentials token) and for a
    capped time (:data:`deepsec.tokens.cache.MAX_RETRY_AFTER`).
    """

    def __setitem__(self, key: Any, value: Any) -> None:
        return None


# --- one MSAL application per identity, for the life of the process ---------------

_apps: dict[str, Future[Any]] = {}
_apps_lock = threading.Lock()


def _credential_digest(credential: str | Mapping[str, Any] | None) -> str:
    if isinstance(credential, Mapping):
        return cache_key(json.dumps(dict(credential), sort_keys=True, default=str))
    return cache_key(credential)


def _app_key(config: EndUserSecConfig, flow: Flow) -> str:
    return cache_key(
        "msal-app",
        flow,
        config.authority,
        config.client_id,
        _credential_digest(config.client_credential),
        config.ca_file,
        config.timeout,
        config.instance_discovery,
    )


def _build_app(config: EndUserSecConfig, flow: Flow) -> Any:
    session = TimeoutSession(config.timeout, config.ca_file)
    kwargs: dict[str, Any] = {}
    if flow == "on_behalf_of":
        kwargs["token_cache"] = _NoStoreTokenCache()
    return msal.ConfidentialClientApplication(
        client_id=config.client_id,
        client_credential=config.client_credential,
        authority=config.authority,
        http_client=session,
        http_cache=_NoStoreHttpCache(),
        instance_discovery=config.instance_discovery,
        azure_region=False,  # MSAL_FORCE_REGION in the environment must not apply
        **kwargs,
    )


def _msal_app(config: EndUserSecConfig, flow: Flow, budget: Deadline) -> Any:
    """The process-wide MSAL application; built once (single-flight).

    Building it fetches the provider's OpenID configuration; a failure is
    not remembered, so the next call tries again.  A caller waiting for
    another thread's build waits no longer than its own ``budget``.
    """
    key = _app_key(config, flow)
    future = _apps.get(key)
    if future is None or (future.done() and future.exception() is not None):
        with _apps_lock:
            future = _apps.get(key)
            leader = future is None or (future.done() and future.exception() is not None)
            if leader:
                future = _apps[key] = Future()
                future.set_running_or_notify_cancel()
        assert future is not None
        if leader:
            try:
                future.set_result(_build_app(config, flow))
            except BaseException as exc:
                future.set_exception(exc)
    assert future is not None
    return future.result(timeout=max(0.0, budget.remaining()))


def _existing_app(config: EndUserSecConfig, flow: Flow) -> Any | None:
    future = _apps.get(_app_key(config, flow))
    if future is None or not future.done() or future.exception() is not None:
        return None
    return future.result()


def reset_msal_apps() -> None:
    """Forget every MSAL application (and with it MSAL's token caches).

    :func:`deepsec.tokens.clear_token_sources` calls this too.
    """
    with _apps_lock:
        _apps.clear()


class AzureTokenSource:
    """Database-access tokens from Entra ID (MSAL), cached for load.

    Config keys used: ``authority``, ``client_id``, ``client_credential``
    (secret string or MSAL certificate mapping), ``scopes``, ``auth_flow``,
    ``timeout``, ``ca_file``, ``instance_discovery``, ``cache_size``.
    """

    def __init__(self, config: EndUserSecConfig) -> None:
        if config.spi_type != "azure_tokens":
            raise ValueError(
                f"AzureTokenSource needs spi_type 'azure_tokens', not {config.spi_type!r}"
            )
        self.config = config
        self.flow: Flow = config.auth_flow
        self._scopes = list(config.scopes)
        self.cache = token_cache_for(config, f"azure:{self.flow}")
        self._cc_key = cache_key("azure", "client_credentials", config.token_fingerprint)
        prefix = f"azure-obo:{config.token_fingerprint}"
        self._keys = KeyMemo(lambda token: cache_key(prefix, token), max(1024, config.cache_size))
        self._secrets: tuple[str, ...] = (
            (config.client_credential,) if isinstance(config.client_credential, str) else ()
        )
        if isinstance(config.client_credential, str):
            register_secret(self, config.client_credential)

    def __repr__(self) -> str:
        return (
            f"AzureTokenSource(authority={self.config.authority!r}, "
            f"client_id={self.config.client_id!r}, auth_flow={self.flow!r})"
        )

    # --- TokenSource -----------------------------------------------------------------

    def cached_token(self, context: EndUserContext) -> str | None:
        """A still-valid cached token for ``context``, or ``None`` (no I/O, no lock)."""
        if self.flow == "client_credentials":
            return self.cache.peek(self._cc_key)
        identity = context.identity
        if type(identity) is not str:
            return None
        return self.cache.peek(self._keys.key(identity))

    def cached_entry(
        self, context: EndUserContext, record: bool = True
    ) -> tuple[str, float] | None:
        """The cached token and when it stops being served (epoch), or ``None``.

        ``record=False``: a re-read after :meth:`get_token`, not counted as a hit.
        """
        if self.flow == "client_credentials":
            return self.cache.peek_entry(self._cc_key, record)
        identity = context.identity
        if type(identity) is not str:
            return None
        return self.cache.peek_entry(self._keys.key(identity), record)

    def get_token(self, context: EndUserContext) -> str:
        """A valid token for ``context``; blocks on the provider on a miss.

        Raises:
            IdentityError: ``on_behalf_of`` without a user token identity.
            TokenAcquisitionError: the provider refused, failed or timed out.
        """
        key, fetch = self._plan(context)
        return self.cache.get(key, fetch)

    async def get_token_async(self, context: EndUserContext) -> str:
        """Like :meth:`get_token`; a miss runs in a worker thread."""
        key, fetch = self._plan(context)
        return await self.cache.aget(key, fetch)

    def invalidate(self, context: EndUserContext, token: str | None = None) -> None:
        """Forget the token for ``context`` here and in MSAL's cache.

        With ``token``, only that token: a newer cached one is kept.
        """
        if self.flow == "client_credentials":
            rejected = token if token is not None else self.cache.peek(self._cc_key)
            self.cache.invalidate(self._cc_key, token)
            if rejected is not None:
                self._forget_in_msal(rejected)
            return
        identity = context.identity
        if isinstance(identity, str):
            self.cache.invalidate(self._keys.key(identity), token)

    def _forget_in_msal(self, token: str) -> None:
        """Remove ``token`` from the client-credentials application's MSAL cache."""
        app = _existing_app(self.config, "client_credentials")
        if app is None:
            return
        cache = app.token_cache
        stale = [
            at
            for at in cache.search(cache.CredentialType.ACCESS_TOKEN)
            if at.get("secret") == token
        ]
        for at in stale:
            cache.remove_at(at)

    # --- fetching ------------------------------------------------------------------------

    def _plan(self, context: EndUserContext) -> tuple[str, Callable[[], FetchResult]]:
        if self.flow == "client_credentials":
            return self._cc_key, self._fetch_client_credentials
        identity = context.identity
        if not isinstance(identity, str) or not identity.strip():
            kind = "no identity" if identity is None else "a (name, key) identity"
            raise IdentityNotAccepted(
                "auth_flow 'on_behalf_of' needs the end user's access token as the identity "
                f"(a non-empty string); the current end-user context has {kind}"
            )
        user_token = identity
        return self._keys.key(user_token), lambda: self._fetch_on_behalf_of(user_token)

    def _fetch_client_credentials(self) -> FetchResult:
        def call(app: Any) -> Any:
            return app.acquire_token_for_client(scopes=self._scopes)

        return self._acquire("client_credentials", call, ())

    def _fetch_on_behalf_of(self, user_token: str) -> FetchResult:
        user_exp = jwt_expiry(user_token)
        if user_exp is not None and user_exp <= time.time():
            raise TokenAcquisitionError(
                "on-behalf-of token request not sent: the end user's token has expired",
                error="expired_user_token",
            )

        def call(app: Any) -> Any:
            return app.acquire_token_on_behalf_of(user_assertion=user_token, scopes=self._scopes)

        result = self._acquire("on_behalf_of", call, (user_token,))
        if user_exp is not None and user_exp < result.expires_at:
            # Never serve an OBO token past the user's own token.
            result = FetchResult(result.token, user_exp)
        return result

    def _acquire(
        self, flow: Flow, call: Callable[[Any], Any], extra_secrets: tuple[str, ...]
    ) -> FetchResult:
        """One MSAL call, all of it (discovery, token request) within ``timeout``."""
        what = f"Entra ID {flow.replace('_', '-')} token request"
        secrets = (*self._secrets, *extra_secrets)
        started = time.time()
        with deadline(self.config.timeout) as budget:
            try:
                app = _msal_app(self.config, flow, budget)
                result = call(app)
            except concurrent.futures.TimeoutError:  # another thread's app build
                error = timeout_error(what)
                logger.debug("%s failed: %s", what, error)
                raise error from None
            except msal.exceptions.MsalServiceError as exc:
                # MSAL raises this for HTTP >= 500 ("HTTP Error: 503"); the body is gone.
                match = re.search(r"HTTP Error: (\d{3})", str(exc))
                status = int(match.group(1)) if match else None
                error = TokenAcquisitionError(
                    f"{what}: the identity provider answered HTTP {status}",
                    error="server_error",
                    status=status,
                    retry_after=budget.retry_after,
                )
                logger.debug("%s failed: %s", what, error)
                raise error from None
            except Exception as exc:
                error = error_from_exception(exc, what, secrets)
                logger.debug("%s failed: %s", what, error)
                raise error from None
        if not isinstance(result, Mapping):
            raise TokenAcquisitionError(
                f"{what}: MSAL returned no result", error="invalid_response"
            )
        token = result.get("access_token")
        if not isinstance(token, str) or not token:
            error_code, description, correlation = provider_error_fields(result)
            logger.debug("%s failed: error=%s correlation_id=%s", what, error_code, correlation)
            raise TokenAcquisitionError(
                f"{what} failed",
                error=error_code or "invalid_response",
                correlation_id=correlation,
                retry_after=budget.retry_after,
                description=scrub(description, secrets) if description else None,
            )
        try:
            expires_at = token_expiry(token, result.get("expires_in"), started, what)
        except TokenAcquisitionError:
            if flow == "client_credentials":
                self._forget_in_msal(token)  # MSAL must not serve it from its cache either
            raise
        logger.debug(
            "%s succeeded (source=%s, expires in %.0f s)",
            what,
            result.get("token_source", "?"),
            expires_at - time.time(),
        )
        return FetchResult(token, expires_at)
