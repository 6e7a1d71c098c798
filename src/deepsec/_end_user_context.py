"""The end-user context value: who database work is done for.

:class:`EndUserContext` is immutable and validated when made; equal token
identities share one (a bounded memo, :func:`context_for_token`).
:mod:`deepsec.context` holds the current one in a contextvar, and is where
applications import it from.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, Final

from ._validation import (
    Identity,
    _check_roles_with_local_user,
    _same_attributes,
    validate_attributes,
    validate_data_roles,
    validate_identity,
)

__all__ = ["APPLICATION", "EndUserContext", "context_for_token", "forget_token_contexts"]

# Key of the local-user tag in repr(): a user's tag is stable within this
# process (log lines of one user can be told apart) but cannot be linked
# back to the name without the key, which never leaves the process.
_REPR_KEY: Final = os.urandom(16)


def _local_user_tag(name: object) -> str:
    digest = hmac.new(_REPR_KEY, str(name).encode("utf-8", "surrogatepass"), hashlib.sha256)
    return digest.hexdigest()[:8]


class _Keep(Enum):
    KEEP = "keep"


_KEEP: Final = _Keep.KEEP


class EndUserContext:
    """An immutable end-user context: identity, data roles and attributes.

    ``identity`` is ``None`` when no end user is known; such a context attaches
    nothing, so the database work runs least-privileged as the application.
    ``data_roles`` and ``attributes`` given here win over the ones configured
    in ``end_user_sec_params``.

    Raises:
        TypeError, IdentityError: a value is malformed (the message names it).
    """

    __slots__ = ("_attributes", "_data_roles", "_identity")

    _identity: Identity | None
    _data_roles: tuple[str, ...] | None
    _attributes: Mapping[str, Any] | None

    def __init__(
        self,
        identity: Identity | list[Any] | None,
        data_roles: Sequence[str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        setattr_ = object.__setattr__
        if data_roles is None and attributes is None:
            # The per-request case (a token and nothing else): same checks,
            # fewer calls; this runs for every request of every adapter.
            setattr_(self, "_identity", validate_identity(identity))
            setattr_(self, "_data_roles", None)
            setattr_(self, "_attributes", None)
            return
        ident = validate_identity(identity)
        roles = validate_data_roles(data_roles)
        _check_roles_with_local_user(ident, roles)
        setattr_(self, "_identity", ident)
        setattr_(self, "_data_roles", roles)
        setattr_(self, "_attributes", validate_attributes(attributes))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("EndUserContext is immutable")

    @property
    def identity(self) -> Identity | None:
        """The token string, the ``(name, key)`` tuple, or ``None``."""
        return self._identity

    @property
    def data_roles(self) -> tuple[str, ...] | None:
        """Data roles for this end user, or ``None`` to use the configured ones."""
        return self._data_roles

    @property
    def attributes(self) -> Mapping[str, Any] | None:
        """Read-only attributes, or ``None`` to use the configured ones."""
        return self._attributes

    @property
    def is_local_user(self) -> bool:
        """True for a ``(name, key)`` database end user."""
        return isinstance(self._identity, tuple)

    @property
    def name(self) -> str | None:
        """The local end user's name; ``None`` for a token identity."""
        return self._identity[0] if isinstance(self._identity, tuple) else None

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, EndUserContext):
            return NotImplemented
        return (
            self._identity == other._identity
            and self._data_roles == other._data_roles
            and _same_attributes(self._attributes, other._attributes)
        )

    __hash__ = None  # type: ignore[assignment]  # attributes are a mapping

    def __repr__(self) -> str:
        # Tokens and keys are secrets and a local user's name is an identity
        # (this repr reaches DEBUG logs): show their kind and a keyed tag only.
        if self._identity is None:
            ident = "None"
        elif isinstance(self._identity, tuple):
            key = "None" if self._identity[1] is None else "'***'"
            ident = f"(<local user {_local_user_tag(self._identity[0])}>, {key})"
        else:
            ident = "<token>"
        attrs = None if self._attributes is None else sorted(self._attributes)
        return (
            f"EndUserContext(identity={ident}, data_roles={self._data_roles!r}, "
            f"attributes={attrs!r})"
        )

    __str__ = __repr__

    def replace(
        self,
        *,
        identity: Identity | list[Any] | _Keep | None = _KEEP,
        data_roles: Sequence[str] | _Keep | None = _KEEP,
        attributes: Mapping[str, Any] | _Keep | None = _KEEP,
    ) -> EndUserContext:
        """A copy with some fields changed (validated again)."""
        return EndUserContext(
            self._identity if identity is _KEEP else identity,
            self._data_roles if data_roles is _KEEP else data_roles,
            self._attributes if attributes is _KEEP else attributes,
        )


_EMPTY = EndUserContext(None)
#: The context inside ``with as_application():``: no end user, on purpose.
#: Compared by identity (``is``): strict mode lets statements through only
#: under this very object, so a context built elsewhere can never pass for it.
APPLICATION = EndUserContext(None)


# Validated contexts of recent token identities, by token: a documented cache
# (docs/performance.md).  ``end_user(token)`` runs once per request in apps
# that scope their own work; equal tokens share one immutable context, so a
# repeat neither validates nor allocates again, and the hook's caches meet
# the same object.  Keys are exact ``str`` only: a subclass could answer
# ``==`` for another user's token.  Bounded in count and token length, ASCII
# tokens only (any other is validated every time), so it holds at most ~4 MB;
# forget_security_contexts() (tests, key rotation) empties it too.
_TOKEN_CONTEXTS_KEPT: Final = 512
_TOKEN_CONTEXT_MAX_LEN: Final = 8192
_token_contexts: dict[str, EndUserContext] = {}


def context_for_token(token: str) -> EndUserContext:
    """The validated context of a token identity (shared; see above).

    Raises:
        IdentityError: the token is empty, blank or too long.
    """
    if type(token) is not str:
        return EndUserContext(token)  # (validated, never remembered)
    context = _token_contexts.get(token)
    if context is None:
        context = EndUserContext(token)
        # ASCII only (JWTs are): the bound is then one byte per character.
        if len(token) <= _TOKEN_CONTEXT_MAX_LEN and token.isascii():
            if len(_token_contexts) >= _TOKEN_CONTEXTS_KEPT:
                # The oldest first; another thread may have taken it already.
                try:  # noqa: SIM105
                    del _token_contexts[next(iter(_token_contexts))]
                except (KeyError, RuntimeError, StopIteration):
                    pass
            _token_contexts[token] = context
    return context


def forget_token_contexts() -> None:
    """Drop the remembered token contexts (tests; after handling a token leak)."""
    _token_contexts.clear()
