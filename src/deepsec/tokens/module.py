"""A token source backed by a custom ``spi_type`` module.

The module exposes ``get_database_access_token(end_user_sec_params, identity)
-> str``, the same extension point python-oracledb's plugin uses for its own
``azure_tokens`` and ``oci_tokens``.  Results are cached per identity in a
:class:`~deepsec.tokens.cache.TokenCache` (single-flight, refresh-ahead,
bounded by ``cache_size``): until the JWT's ``exp`` claim (less the cache's
safety margin) when the token is a JWT, otherwise for
:data:`OPAQUE_TOKEN_TTL` seconds.  An ``exp`` that is not a finite number or
lies more than a day ahead is a :class:`~deepsec.errors.TokenAcquisitionError`.
A failure is remembered for a few seconds per identity, and callers waiting
for another caller's fetch give up after ``timeout``; the module's own call
is bounded only by the module.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..errors import TokenAcquisitionError
from ._lifetime import checked_exp
from .cache import FetchResult, KeyMemo, cache_key, jwt_expiry
from .shared import token_cache_for

if TYPE_CHECKING:
    from ..config import EndUserSecConfig
    from ..context import EndUserContext

__all__ = ["OPAQUE_TOKEN_TTL", "ModuleTokenSource", "identity_key", "jwt_expiry"]

#: Lifetime in seconds given to a token that carries no ``exp`` (not a JWT).
OPAQUE_TOKEN_TTL = 60.0


def _identity_digest(identity: object) -> str:
    return cache_key(type(identity).__name__, repr(identity))


class _NoIdentity:
    identity = None


_NO_IDENTITY: Any = _NoIdentity()


def identity_key(context: EndUserContext) -> str:
    """A cache key for the context's identity that holds no secret (sha256 hex)."""
    return _identity_digest(context.identity)


class ModuleTokenSource:
    """Calls a custom module's ``get_database_access_token`` and caches the result."""

    def __init__(self, config: EndUserSecConfig) -> None:
        if config.module is None:
            raise ValueError("ModuleTokenSource needs a config with a custom spi_type module")
        self.config = config
        self._fn: Any = config.module.get_database_access_token
        self.cache = token_cache_for(config, f"module:{config.spi_type}")
        prefix = config.token_fingerprint
        self._none_key = cache_key(prefix, identity_key(_NO_IDENTITY))
        self._keys = KeyMemo(
            lambda identity: cache_key(prefix, _identity_digest(identity)),
            max(1024, config.cache_size),
        )

    def __repr__(self) -> str:
        return f"ModuleTokenSource(spi_type={self.config.spi_type!r})"

    def _key(self, context: EndUserContext) -> str:
        identity = context.identity
        return self._none_key if identity is None else self._keys.key(identity)

    def cached_token(self, context: EndUserContext) -> str | None:
        """A still-valid cached token for ``context``, or ``None`` (no I/O)."""
        return self.cache.peek(self._key(context))

    def cached_entry(
        self, context: EndUserContext, record: bool = True
    ) -> tuple[str, float] | None:
        """The cached token and when it stops being served (epoch), or ``None``.

        ``record=False``: a re-read after :meth:`get_token`, not counted as a hit.
        """
        return self.cache.peek_entry(self._key(context), record)

    def get_token(self, context: EndUserContext) -> str:
        """Return the module's token for ``context`` (cached; single-flight)."""
        identity = context.identity
        return self.cache.get(self._key(context), lambda: self._fetch(identity))

    async def get_token_async(self, context: EndUserContext) -> str:
        """Like :meth:`get_token`; a miss runs in a worker thread."""
        identity = context.identity
        return await self.cache.aget(self._key(context), lambda: self._fetch(identity))

    def invalidate(self, context: EndUserContext, token: str | None = None) -> None:
        """Forget the cached token for ``context`` (only ``token``, if given)."""
        self.cache.invalidate(self._key(context), token)

    def _fetch(self, identity: object) -> FetchResult:
        try:
            token = self._fn(self.config.raw_params(), identity)
        except TokenAcquisitionError:
            raise
        except Exception as exc:
            raise TokenAcquisitionError(
                f"spi_type {self.config.spi_type!r} failed to return a token "
                f"({exc.__class__.__name__})"
            ) from None
        if not isinstance(token, str) or not token:
            raise TokenAcquisitionError(
                f"spi_type {self.config.spi_type!r} returned {type(token).__name__}, "
                "not a non-empty token string"
            )
        exp = checked_exp(token, time.time(), f"spi_type {self.config.spi_type!r}")
        if exp is not None:
            return FetchResult(token, exp)
        return FetchResult(token, time.time() + OPAQUE_TOKEN_TTL, exact=True)
