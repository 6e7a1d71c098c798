"""OCI IAM identity-domain database-access tokens (OAuth client credentials).

:class:`OCITokenSource` serves ``spi_type='oci_tokens'``: ``authority`` is the
full token URL of an identity domain (for example
``https://idcs-xxx.identity.oraclecloud.com/oauth2/v1/token``); the request
is ``POST`` with HTTP Basic client authentication and the form
``grant_type=client_credentials&scope=...``.

Fixes over python-oracledb's ``oci_tokens`` plugin: one deadline of
``timeout`` seconds for the whole fetch, retries and backoff included (the
plugin had no timeout at all), bounded retries with exponential backoff and
jitter on 429, 5xx and connection failures (a small ``Retry-After`` is
honoured when it fits in the time left), TLS trust from ``ca_file`` or the
``certifi`` bundle that the environment cannot change, single-flight caching,
typed errors without secrets.

A read timeout is not retried: the provider may still be working on the
request, and retrying would multiply the load on it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import requests

from ..errors import TokenAcquisitionError
from ._http import (
    TimeoutSession,
    current_deadline,
    deadline,
    error_from_exception,
    is_timeout,
    parse_retry_after,
    provider_error_fields,
    register_secret,
    scrub,
    timeout_error,
)
from ._lifetime import token_expiry
from .cache import FetchResult, cache_key
from .shared import token_cache_for

if TYPE_CHECKING:
    from ..config import EndUserSecConfig
    from ..context import EndUserContext

__all__ = ["BACKOFF_BASE", "BACKOFF_MAX", "MAX_RETRY_AFTER", "OCITokenSource"]

logger = logging.getLogger("deepsec.tokens.oci")

#: First backoff delay in seconds (doubled on every retry, with full jitter).
BACKOFF_BASE = 0.1
#: Longest backoff delay in seconds.
BACKOFF_MAX = 2.0
#: A ``Retry-After`` longer than this (seconds), or longer than the time left
#: of the fetch's deadline, is not waited for inside the fetch: the error is
#: raised at once (and the token cache remembers it, see
#: :data:`deepsec.tokens.cache.MAX_RETRY_AFTER`).
MAX_RETRY_AFTER = 5.0

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


def _retry_after(response: requests.Response) -> float | None:
    return parse_retry_after(response.headers.get("Retry-After"))


class OCITokenSource:
    """Database-access tokens from an OCI IAM identity domain, cached for load.

    Config keys used: ``authority`` (token URL), ``client_id``,
    ``client_credential`` (secret), ``scopes`` (joined with spaces),
    ``timeout`` (the whole fetch, retries included), ``max_retries``, ``ca_file``,
    ``cache_size``.  The end-user identity does not change the token (one
    cache entry).
    """

    def __init__(self, config: EndUserSecConfig) -> None:
        if config.spi_type != "oci_tokens":
            raise ValueError(f"OCITokenSource needs spi_type 'oci_tokens', not {config.spi_type!r}")
        if not isinstance(config.client_credential, str):
            raise ValueError("oci_tokens needs a client secret string as client_credential")
        self.config = config
        self.cache = token_cache_for(config, "oci")
        self._key = cache_key("oci", "client_credentials", config.token_fingerprint)
        self._session = TimeoutSession(config.timeout, config.ca_file)
        self._auth = (config.client_id or "", config.client_credential)
        self._secret = config.client_credential
        register_secret(self, config.client_credential)
        self._form = {"grant_type": "client_credentials", "scope": " ".join(config.scopes)}

    def __repr__(self) -> str:
        return (
            f"OCITokenSource(authority={self.config.authority!r}, "
            f"client_id={self.config.client_id!r})"
        )

    # --- TokenSource -----------------------------------------------------------------

    def cached_token(self, context: EndUserContext) -> str | None:
        """The cached token, or ``None`` (no I/O, no lock)."""
        return self.cache.peek(self._key)

    def cached_entry(
        self, context: EndUserContext, record: bool = True
    ) -> tuple[str, float] | None:
        """The cached token and when it stops being served (epoch), or ``None``.

        ``record=False``: a re-read after :meth:`get_token`, not counted as a hit.
        """
        return self.cache.peek_entry(self._key, record)

    def get_token(self, context: EndUserContext) -> str:
        """A valid token; blocks on the provider on a miss.

        Raises:
            TokenAcquisitionError: the provider refused, failed or timed out.
        """
        return self.cache.get(self._key, self._fetch)

    async def get_token_async(self, context: EndUserContext) -> str:
        """Like :meth:`get_token`; a miss runs in a worker thread."""
        return await self.cache.aget(self._key, self._fetch)

    def invalidate(self, context: EndUserContext, token: str | None = None) -> None:
        """Forget the cached token (only ``token``, if given)."""
        self.cache.invalidate(self._key, token)

    # --- fetching ------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(BACKOFF_MAX, BACKOFF_BASE * (2**attempt)))

    def _fetch(self) -> FetchResult:
        with deadline(self.config.timeout):
            try:
                return self._attempts()
            except TokenAcquisitionError:
                raise
            except Exception as exc:
                raise error_from_exception(exc, "OCI IAM token request", (self._secret,)) from None

    def _sleep(self, seconds: float, what: str, reason: str) -> bool:
        """Back off before a retry if that leaves time for it; False if it does not."""
        budget = current_deadline()
        if budget is not None and seconds >= budget.remaining():
            return False
        logger.debug("%s: %s; retry in %.2f s", what, reason, seconds)
        time.sleep(seconds)
        return True

    def _attempts(self) -> FetchResult:
        what = "OCI IAM token request"
        url = self.config.authority or ""
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            started = time.time()
            try:
                response = self._session.post(
                    url,
                    data=self._form,
                    auth=self._auth,
                    headers={"Accept": "application/json"},
                )
            except requests.RequestException as exc:
                if is_timeout(exc):
                    # connect timeouts are retried; read timeouts are not (see module doc)
                    retry = isinstance(exc, requests.ConnectTimeout) and not last
                    if retry and self._sleep(self._backoff(attempt), what, "connect timeout"):
                        continue
                    raise timeout_error(what) from None
                if (
                    isinstance(exc, requests.ConnectionError)
                    and not isinstance(exc, requests.exceptions.SSLError)
                    and not last
                    and self._sleep(self._backoff(attempt), what, type(exc).__name__)
                ):
                    continue
                raise error_from_exception(exc, what, (self._secret,)) from None

            status = response.status_code
            if status == 200:
                return self._parse(response, started, what)
            if status in _RETRY_STATUS and not last:
                delay = self._backoff(attempt)
                retry_after = _retry_after(response)
                if retry_after is None or retry_after <= MAX_RETRY_AFTER:
                    delay = max(delay, retry_after or 0.0)
                    if self._sleep(delay, what, f"HTTP {status}"):
                        continue
            raise self._http_error(response, what)
        raise AssertionError("unreachable")  # pragma: no cover

    def _http_error(self, response: requests.Response, what: str) -> TokenAcquisitionError:
        status = response.status_code
        error = description = correlation = None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, Mapping):
            error, description, correlation = provider_error_fields(body)
        correlation = correlation or response.headers.get("opc-request-id")
        logger.debug("%s failed: status=%s error=%s", what, status, error)
        return TokenAcquisitionError(
            f"{what}: the identity provider answered HTTP {status}",
            error=error or ("server_error" if status >= 500 else "invalid_request"),
            correlation_id=correlation,
            status=status,
            retry_after=_retry_after(response),
            description=scrub(description, (self._secret,)) if description else None,
        )

    def _parse(self, response: requests.Response, started: float, what: str) -> FetchResult:
        try:
            body: Any = response.json()
        except ValueError:
            raise TokenAcquisitionError(
                f"{what}: the identity provider sent an invalid response (not JSON)",
                error="invalid_response",
                status=response.status_code,
            ) from None
        token = body.get("access_token") if isinstance(body, Mapping) else None
        if not isinstance(token, str) or not token:
            raise TokenAcquisitionError(
                f"{what}: the response has no access_token",
                error="invalid_response",
                status=response.status_code,
            )
        expires_at = token_expiry(token, body.get("expires_in"), started, what)
        logger.debug("%s succeeded (expires in %.0f s)", what, expires_at - time.time())
        return FetchResult(token, expires_at)
