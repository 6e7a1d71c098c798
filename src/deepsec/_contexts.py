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
from dataclasses import dataclass
from typing import Any

import oracledb

from .config import EndUserSecConfig
from .context import EndUserContext
from .errors import IdentityError

__all__ = [
    "Prepared",
    "build_from_parts",
    "build_security_context",
    "forget_security_contexts",
    "keep_prepared",
    "prepared",
    "prepared_key",
    "prepared_lock",
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


@dataclass(frozen=True, slots=True)
class Prepared:
    """A built security context and the token it holds, shared by connections."""

    token: str
    context: Any  # oracledb.EndUserSecurityContext
    #: Until this time.monotonic() value it is served without asking the token
    #: source: at most _RECHECK_INTERVAL, and never past the token's usable life.
    check_until: float


#: Most prepared contexts kept (each holds its token and encoded payload, a few KB).
_PREPARED_KEPT = 1024
prepared: dict[tuple[Any, ...], Prepared] = {}
prepared_lock = threading.Lock()


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
    # The slots, not the properties: this runs on the first round trip of every
    # request (each pool acquire), where every call shows in bench/hook.py.
    attributes = ctx._attributes
    return (
        config.fingerprint,
        ctx._identity,
        ctx._data_roles,
        None if attributes is None else _attributes_key(attributes),
        config.auth_flow == "on_behalf_of" and _obo_alone(conn),
    )


def _obo_alone(conn: Any) -> bool:
    """Whether the on-behalf-of token alone identifies the user (23.26.4+)."""
    return _version_tuple(conn.version) >= (23, 26, 4)


def keep_prepared(key: tuple[Any, ...], entry: Prepared) -> None:
    """Keep ``entry`` for ``key``; the oldest entry goes when the bound is reached."""
    with prepared_lock:
        if key not in prepared and len(prepared) >= _PREPARED_KEPT:
            del prepared[next(iter(prepared))]  # the oldest
        prepared[key] = entry


def forget_security_contexts() -> None:
    """Drop every built security context kept for reuse (tests, key rotation)."""
    with prepared_lock:
        prepared.clear()


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
