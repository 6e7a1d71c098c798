"""A token source backed by a custom ``spi_type`` module.

The module exposes ``get_database_access_token(end_user_sec_params, identity)
-> str``, the same extension point python-oracledb's plugin uses for its own
``azure_tokens`` and ``oci_tokens``.  Results are cached per identity: until
the JWT's ``exp`` claim (less a safety margin) when the token is a JWT,
otherwise for :data:`OPAQUE_TOKEN_TTL` seconds.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import TokenAcquisitionError

if TYPE_CHECKING:
    from ..config import EndUserSecConfig
    from ..context import EndUserContext

__all__ = ["OPAQUE_TOKEN_TTL", "ModuleTokenSource", "jwt_expiry"]

OPAQUE_TOKEN_TTL = 60.0
EXPIRY_MARGIN = 30.0


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (unverified), or ``None`` if it has none."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        exp = json.loads(base64.urlsafe_b64decode(payload)).get("exp")
    except (ValueError, AttributeError):
        return None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def identity_key(context: EndUserContext) -> str:
    """A cache key for the context's identity that holds no secret."""
    material = repr((type(context.identity).__name__, context.identity)).encode()
    return hashlib.sha256(material).hexdigest()


class ModuleTokenSource:
    """Calls a custom module's ``get_database_access_token`` and caches the result."""

    def __init__(self, config: EndUserSecConfig) -> None:
        assert config.module is not None
        self.config = config
        self._fn: Any = config.module.get_database_access_token
        self._cache: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ModuleTokenSource(spi_type={self.config.spi_type!r})"

    def cached_token(self, context: EndUserContext) -> str | None:
        entry = self._cache.get(identity_key(context))
        if entry is not None and entry[1] > time.time():
            return entry[0]
        return None

    def get_token(self, context: EndUserContext) -> str:
        token = self.cached_token(context)
        if token is not None:
            return token
        try:
            token = self._fn(self.config.raw_params(), context.identity)
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
        exp = jwt_expiry(token)
        until = exp - EXPIRY_MARGIN if exp is not None else time.time() + OPAQUE_TOKEN_TTL
        with self._lock:
            self._cache[identity_key(context)] = (token, until)
        return token

    async def get_token_async(self, context: EndUserContext) -> str:
        token = self.cached_token(context)
        if token is not None:
            return token
        return await asyncio.to_thread(self.get_token, context)

    def invalidate(self, context: EndUserContext) -> None:
        with self._lock:
            self._cache.pop(identity_key(context), None)
