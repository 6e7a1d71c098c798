"""Database-access token sources.

A :class:`TokenSource` turns the current :class:`~deepsec.EndUserContext` into
the database-access token that goes into the end-user security context.  One
source exists per distinct ``end_user_sec_params`` for the life of the process
(:func:`token_source_for`), so MSAL applications and token caches are reused.

``spi_type`` selects the source: ``azure_tokens`` (MSAL), ``oci_tokens`` (OCI
IAM identity domain) or the dotted path of any module exposing
``get_database_access_token(end_user_sec_params: dict, identity) -> str``.

With ``token_cache`` set, every source's cache is also shared by the fleet
through Redis (:mod:`deepsec.tokens.shared`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..config import EndUserSecConfig
    from ..context import EndUserContext

__all__ = ["TokenSource", "clear_token_sources", "token_source_for"]


@runtime_checkable
class TokenSource(Protocol):
    """Where database-access tokens come from, with their cache.

    ``get_token`` may block on the network (sync callers);
    ``get_token_async`` never blocks the event loop; ``cached_token`` only
    reads memory and is what the per-round-trip callback uses on asyncio
    connections.
    """

    config: EndUserSecConfig

    def get_token(self, context: EndUserContext) -> str:
        """Return a valid token for ``context``, fetching it if needed."""
        ...

    async def get_token_async(self, context: EndUserContext) -> str:
        """Like :meth:`get_token`, without blocking the running event loop."""
        ...

    def cached_token(self, context: EndUserContext) -> str | None:
        """A still-valid cached token for ``context``, or ``None``; never does I/O."""
        ...

    def invalidate(self, context: EndUserContext, token: str | None = None) -> None:
        """Forget the cached token for ``context`` (the database rejected it).

        With ``token``, only if that is still the cached one (compare-and-drop):
        a token fetched since the rejected one was attached is kept.
        """
        ...


_sources: dict[str, TokenSource] = {}
_lock = threading.Lock()


def _build(config: EndUserSecConfig) -> TokenSource:
    if config.spi_type == "azure_tokens":
        from .azure import AzureTokenSource

        return AzureTokenSource(config)
    if config.spi_type == "oci_tokens":
        from .oci import OCITokenSource

        return OCITokenSource(config)
    from .module import ModuleTokenSource

    return ModuleTokenSource(config)


def token_source_for(config: EndUserSecConfig) -> TokenSource:
    """The process-wide token source for ``config`` (built on first use)."""
    source = _sources.get(config.fingerprint)
    if source is None:
        with _lock:
            source = _sources.get(config.fingerprint)
            if source is None:
                source = _sources[config.fingerprint] = _build(config)
    return source


def clear_token_sources() -> None:
    """Forget every token source, its cached tokens and MSAL applications.

    For tests and key rotation: the next connection builds fresh sources.
    """
    import sys

    with _lock:
        _sources.clear()
        azure = sys.modules.get(f"{__name__}.azure")
        if azure is not None:  # never import msal just to clear it
            azure.reset_msal_apps()
        shared = sys.modules.get(f"{__name__}.shared")
        if shared is not None:  # Redis clients and their circuit breakers
            shared.reset_shared_caches()
    contexts = sys.modules.get("deepsec._contexts")
    if contexts is not None:  # the hook's built security contexts hold these tokens
        contexts.forget_security_contexts()
