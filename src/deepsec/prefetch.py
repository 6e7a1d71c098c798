"""Tokens fetched ahead of time, off the event loop: :func:`prepare`.

asyncio connections never fetch a token inside a round trip (that would block
the loop), so ``async with deepsec.end_user(...)``, the ASGI/FastAPI adapters
and the Celery integration fetch what the current end user will need first.
This module knows every ``end_user_sec_params`` connected with in this process
(the hook registers them) and remembers, per context object, a fetch that
failed, so the statement that needed the token raises the real error.
"""

from __future__ import annotations

import asyncio

from .config import EndUserSecConfig
from .context import EndUserContext, current_context
from .errors import USER_TOKEN_REJECTED, DeepSecError, IdentityNotAccepted, TokenAcquisitionError
from .tokens import token_source_for

__all__ = [
    "configs_in_use",
    "forget_prefetch_configs",
    "prepare",
    "recalled_failure",
    "register_config",
    "remember_failure",
]

# Every config a connection or pool was made with in this process: what
# prepare() fetches tokens for.  (Kept by value: tracking pools' lifetimes would
# depend on when the garbage collector frees a closed pool.)
configs_in_use: dict[str, EndUserSecConfig] = {}


def register_config(config: EndUserSecConfig) -> None:
    """Note that ``config`` is connected with in this process: :func:`prepare` covers it."""
    configs_in_use.setdefault(config.fingerprint, config)


# Token failures met while fetching ahead of time (prepare(), async on-connect),
# per (config, context object): the asyncio round trip that needed the token
# raises the real error instead of TokenNotReadyError.  Bounded.
_failures: dict[tuple[str, int], tuple[EndUserContext, DeepSecError]] = {}
_FAILURES_KEPT = 256


def remember_failure(config: EndUserSecConfig, ctx: EndUserContext, exc: DeepSecError) -> None:
    if len(_failures) >= _FAILURES_KEPT:
        _failures.clear()
    _failures[(config.fingerprint, id(ctx))] = (ctx, exc)


def recalled_failure(config: EndUserSecConfig, ctx: EndUserContext) -> DeepSecError | None:
    entry = _failures.get((config.fingerprint, id(ctx)))
    return entry[1] if entry is not None and entry[0] is ctx else None


def forget_prefetch_configs() -> None:
    """Forget which configs :func:`prepare` fetches for (test isolation).

    Connections and pools still open register theirs again on their next
    acquire or token lookup.
    """
    configs_in_use.clear()


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
    configs = list(configs_in_use.values())
    missing = [c for c in configs if token_source_for(c).cached_token(ctx) is None]
    if _failures:
        # A context object now lives beyond one request (adapters reuse one
        # per user): a failure remembered for a source whose token is cached
        # again is stale, and must not answer a later statement.
        for config in configs:
            if config not in missing:
                _failures.pop((config.fingerprint, id(ctx)), None)
    if not missing:
        return
    results = await asyncio.gather(
        *(token_source_for(c).get_token_async(ctx) for c in missing), return_exceptions=True
    )
    failures: list[DeepSecError] = []
    for config, result in zip(missing, results, strict=True):
        if isinstance(result, DeepSecError):
            remember_failure(config, ctx, result)
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
