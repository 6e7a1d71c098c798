"""Built end-user security contexts, shared between connections.

A pool hands out a new Connection object on every acquire, so without reuse
every request would build its security context again
(``create_end_user_security_context``, ~30 us).  :func:`prepared_key` names
everything a built context depends on; the hook keeps a :class:`Prepared`
per key (bounded) and checks its token on reuse.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import oracledb

from .config import EndUserSecConfig
from .context import EndUserContext, forget_token_contexts
from .errors import IdentityError

__all__ = [
    "Prepared",
    "build_from_parts",
    "build_security_context",
    "forget_security_contexts",
    "identity_index",
    "keep_prepared",
    "prepared",
    "prepared_key",
    "prepared_lock",
    "revoke_prepared",
]


def _version_tuple(version: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in (version or "").split("."))[:3]
    except ValueError:
        return ()


# Why sharing is safe (python-oracledb 26.1, read from its source):
# ``create_end_user_security_context`` (oracledb/end_user_security_context.py)
# returns a Python wrapper whose only attribute is ``_impl``, an
# ``EndUserSecurityContextImpl`` (impl/thin/end_user_security_context.pyx).
# That cdef class holds only ``full_payload_oson_bytes``,
# ``partial_payload_oson_bytes``, ``hash_value`` and ``is_localuser`` (the
# attribute list compiled into thin_impl's .so says the same), all assigned
# once in its ``create()`` classmethod and never written again.  What changes
# per connection (the context in use, whether the full payload must be sent
# again: ``_security_context`` / ``_send_full_security_context``) lives on
# ``ThinConnImpl``; ``set_end_user_security_context`` only stores a reference
# after its TCPS and capability checks, and the message writer only reads
# the encoded bytes.  So one built context can serve any number of
# connections and threads at once.


class Prepared:
    """A built security context and the token it holds, shared by connections.

    Connections remember the very object they attached: a different object
    for the same key means a different token or context, so they attach again.
    It is also the round trip's completion (the driver calls it with the
    round trip's outcome): one object per user and token, so attaching it to
    a connection allocates nothing.
    """

    __slots__ = ("check_until", "context", "ctx", "key", "on_error", "revoked", "token")

    def __init__(
        self,
        token: str,
        context: Any,
        check_until: float,
        key: tuple[Any, ...],
        ctx: EndUserContext,
        on_error: Callable[[Prepared, BaseException], None],
    ) -> None:
        self.token = token
        self.context = context  # oracledb.EndUserSecurityContext
        #: Until this time.monotonic() value it is served without asking the token
        #: source: at most _RECHECK_INTERVAL, and never past the token's usable life.
        #: Set to 0 when the database rejects the token, so that every connection
        #: holding it asks again at its next round trip.
        self.check_until = check_until
        self.revoked = False
        self.key = key
        #: The context it was built for (any equal one shares it): what a
        #: rejected token is invalidated for.
        self.ctx = ctx
        #: Called with a failed round trip's error (the hook checks for a
        #: rejected token there).
        self.on_error = on_error

    def __call__(self, outcome: Any) -> None:
        """The completion of a round trip made with this context attached."""
        if outcome is not None:
            self.on_error(self, outcome)

    def revoke(self) -> None:
        """The database rejected this token: nobody may serve it from here again."""
        self.revoked = True
        self.check_until = 0.0


#: Most prepared contexts kept (each holds its token and encoded payload, a few KB).
_PREPARED_KEPT = 1024
#: Estimated bytes all prepared contexts may hold together; the oldest go first.
#: An identity may be 65,535 characters, so the count alone could hold ~180 MB.
_PREPARED_BYTES = 16 * 1024 * 1024
#: A context estimated larger than this is built for its request but not kept:
#: oversized identities must not push real users' contexts out of the budget.
_PREPARED_ENTRY_MAX = 64 * 1024
prepared: dict[tuple[Any, ...], Prepared] = {}
_costs: dict[tuple[Any, ...], int] = {}
_total_cost = 0
#: The token the database last rejected, per key (bounded): a round trip that
#: read it from the cache just before the rejection must not put it back.
_revoked_tokens: dict[tuple[Any, ...], str] = {}
prepared_lock = threading.Lock()
#: The entries of ``prepared`` for plain contexts (a token or local user with
#: no data roles or attributes of its own), by config fingerprint, then by
#: identity: the hook's first round trip of a pooled request finds its
#: user's entry without building the full key.  The same entries as
#: ``prepared`` (kept, dropped and forgotten with them), for configs that
#: asked for an index (:func:`identity_index`: not on-behalf-of, whose key
#: also depends on the connection).
_by_identity: dict[str, dict[Any, Prepared]] = {}


def _attributes_key(attributes: Any) -> str | None:
    # Attributes are a read-only mapping (unhashable): key them by their
    # canonical JSON (validated JSON-compatible when the context was made).
    if attributes is None:
        return None
    return json.dumps(dict(attributes), sort_keys=True, separators=(",", ":"))


def prepared_key(config: EndUserSecConfig, ctx: EndUserContext, conn: Any) -> tuple[Any, ...]:
    """Everything a built context depends on, but the token (checked on reuse).

    The config (whose data roles and attributes are the defaults), the
    identity, the context's own data roles and attributes, and whether the
    identity is left out -- the only reason to read ``conn.version``, so it is
    read for ``on_behalf_of`` only.  Equal values give equal keys: a new
    context object per request still finds its user's entry (a str hash,
    not the sha256 the token cache keys by).
    """
    # The slots, not the properties.  (_index_of reads this layout: keep the
    # two in step.)
    attributes = ctx._attributes
    return (
        config.fingerprint,
        ctx._identity,
        ctx._data_roles,
        None if attributes is None else _attributes_key(attributes),
        config.auth_flow == "on_behalf_of" and _obo_alone(conn),
    )


def identity_index(config: EndUserSecConfig) -> dict[Any, Prepared] | None:
    """``config``'s plain entries by identity (read-only for callers), or ``None``.

    ``None`` for on-behalf-of, whose key depends on the connection too.
    """
    if config.auth_flow == "on_behalf_of":
        return None
    with prepared_lock:
        return _by_identity.setdefault(config.fingerprint, {})


def _index_of(key: tuple[Any, ...]) -> dict[Any, Prepared] | None:
    """The identity index a key's entry belongs in (see :func:`prepared_key`)."""
    if key[2] is None and key[3] is None and key[4] is False:
        return _by_identity.get(key[0])
    return None


def _obo_alone(conn: Any) -> bool:
    """Whether the on-behalf-of token alone identifies the user (23.26.4+)."""
    return _version_tuple(conn.version) >= (23, 26, 4)


def _cost(key: tuple[Any, ...], entry: Prepared) -> int:
    """Estimated bytes of one entry: the key, the token, and the encoded payloads.

    The driver encodes token, identity and attributes twice (full and partial
    payload), so the estimate counts them twice on top of the key's copies.
    """
    identity = key[1]
    ident_len = len(identity) if isinstance(identity, str) else 256
    attrs_len = len(key[3]) if key[3] is not None else 0
    return 512 + 2 * len(entry.token) + 3 * (ident_len + attrs_len)


def keep_prepared(key: tuple[Any, ...], entry: Prepared) -> None:
    """Keep ``entry`` for ``key`` within the count and byte budgets (oldest go first).

    An entry larger than ``_PREPARED_ENTRY_MAX`` is not kept, nor one whose
    token the database rejected for this key.
    """
    global _total_cost
    cost = _cost(key, entry)
    with prepared_lock:
        if entry.revoked or _revoked_tokens.get(key) == entry.token:
            return
        if cost > _PREPARED_ENTRY_MAX:
            _drop(key)
            return
        _drop(key)
        while prepared and (
            len(prepared) >= _PREPARED_KEPT or _total_cost + cost > _PREPARED_BYTES
        ):
            _drop(next(iter(prepared)))  # the oldest
        prepared[key] = entry
        _costs[key] = cost
        _total_cost += cost
        index = _index_of(key)
        if index is not None:
            index[key[1]] = entry


def _drop(key: tuple[Any, ...]) -> None:
    """Forget ``key`` (with ``prepared_lock`` held)."""
    global _total_cost
    if prepared.pop(key, None) is not None:
        _total_cost -= _costs.pop(key, 0)
        index = _index_of(key)
        if index is not None:
            index.pop(key[1], None)


def revoke_prepared(key: tuple[Any, ...], entry: Prepared) -> None:
    """The database rejected ``entry``'s token: drop it if it is still the one kept.

    Compare-and-drop: a fresher entry another connection kept meanwhile stays.
    """
    entry.revoke()
    with prepared_lock:
        if len(_revoked_tokens) >= _PREPARED_KEPT:
            _revoked_tokens.clear()
        _revoked_tokens[key] = entry.token
        if prepared.get(key) is entry:
            _drop(key)


def forget_security_contexts() -> None:
    """Drop every built security context kept for reuse, and the remembered
    token contexts (tests, key rotation)."""
    global _total_cost
    forget_token_contexts()
    with prepared_lock:
        prepared.clear()
        for index in _by_identity.values():
            index.clear()  # (cleared, not dropped: bindings hold them)
        _costs.clear()
        _revoked_tokens.clear()
        _total_cost = 0


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
    obo_alone = config.auth_flow == "on_behalf_of" and _version_tuple(server_version) >= (23, 26, 4)
    return build_from_parts(config, ctx, token, obo_alone)


def build_from_parts(
    config: EndUserSecConfig, ctx: EndUserContext, token: str, obo_alone: bool
) -> Any:
    """Build the context; ``obo_alone`` leaves the identity out (see above)."""
    data_roles = ctx.data_roles if ctx.data_roles is not None else config.data_roles
    attributes = ctx.attributes if ctx.attributes is not None else config.attributes
    if ctx.is_local_user and data_roles:
        raise IdentityError(
            "data roles cannot be set explicitly for a local (name, key) end user "
            "(they come from end_user_sec_params['data_roles'] here); remove them "
            "or use a token identity"
        )
    identity = None if obo_alone else ctx.identity
    return oracledb.create_end_user_security_context(
        token,
        end_user_identity=identity,
        data_roles=list(data_roles) if data_roles is not None else None,
        attributes=dict(attributes) if attributes is not None else None,
    )
