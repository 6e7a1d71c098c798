"""Validation of end-user identities, data roles and attributes.

What :class:`~deepsec.context.EndUserContext` accepts, in one place: the web
policy (:mod:`deepsec.web`), the config parser and the Celery integration
validate with the same functions.  Errors name what is wrong and never echo a
token or key.
"""

from __future__ import annotations

import copy
import json
import types
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from .errors import IdentityError

__all__ = [
    "MAX_IDENTITY_LENGTH",
    "Identity",
    "validate_attributes",
    "validate_data_roles",
    "validate_identity",
]

#: An end-user identity: an IAM token (Entra ID / OCI IAM) or a local database
#: end user ``(name, key_or_None)``.
Identity: TypeAlias = "str | tuple[str, str | None]"

# The driver rejects a security context payload over 65535 bytes (DPY-2072);
# refusing a larger identity early gives a clearer error.
MAX_IDENTITY_LENGTH = 65535


def validate_identity(value: object) -> Identity | None:
    """Return ``value`` as an identity, or raise naming what is wrong.

    ``None`` means "no end user".  A list of two items is accepted and turned
    into a tuple (the plugin's JSON round trip produced lists).
    """
    if value is None:
        return None
    if isinstance(value, str):
        if type(value) is not str:
            # A subclass could answer == and hash() like another user's token
            # in the caches keyed by identity: keep its characters only.
            value = str.__str__(value)
        if not value or value.isspace():  # (strip() would copy a long token)
            raise IdentityError("end-user identity token must be a non-empty string")
        if len(value) > MAX_IDENTITY_LENGTH:
            raise IdentityError(
                f"end-user identity token is {len(value)} characters; "
                f"the limit is {MAX_IDENTITY_LENGTH}"
            )
        return value
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise IdentityError(
                f"a local end-user identity must be (name, key_or_None); got {len(value)} items"
            )
        name, key = value
        # (Plain str copies of subclasses, as for a token above.)
        if isinstance(name, str) and type(name) is not str:
            name = str.__str__(name)
        if isinstance(key, str) and type(key) is not str:
            key = str.__str__(key)
        if not isinstance(name, str):
            raise TypeError(f"end-user name must be a str, not {type(name).__name__}")
        if not name.strip():
            raise IdentityError("end-user name must be a non-empty string")
        if key is not None and not isinstance(key, str):
            raise TypeError(f"end-user key must be a str or None, not {type(key).__name__}")
        if key is not None and not key:
            raise IdentityError("end-user key must be a non-empty string or None")
        return (name, key)
    raise TypeError(
        "end-user identity must be a token string or a (name, key_or_None) tuple, "
        f"not {type(value).__name__}"
    )


def validate_data_roles(value: object) -> tuple[str, ...] | None:
    """Return data roles as a tuple of non-empty strings (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"data_roles must be a list of strings, not {type(value).__name__}")
    roles: list[str] = []
    for i, role in enumerate(value):
        if not isinstance(role, str):
            raise TypeError(f"data_roles[{i}] must be a str, not {type(role).__name__}")
        if not role.strip():
            raise IdentityError(f"data_roles[{i}] must be a non-empty string")
        roles.append(role)
    return tuple(roles)


def validate_attributes(value: object) -> Mapping[str, Any] | None:
    """Return attributes as a read-only mapping of str to JSON-compatible values."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"attributes must be a dict, not {type(value).__name__}")
    for name, item in value.items():
        if not isinstance(name, str) or not name:
            raise IdentityError(f"attribute names must be non-empty strings, got {name!r}")
        try:
            # allow_nan=False: NaN and infinity are not JSON, and a value that
            # cannot be encoded canonically cannot be signed (deepsec.celery).
            json.dumps(item, allow_nan=False)
        except ValueError:
            raise IdentityError(
                f"attribute {name!r} holds NaN, infinity or a circular reference, "
                "which JSON cannot carry"
            ) from None
        except TypeError:
            raise TypeError(
                f"attribute {name!r} has a value of type {type(item).__name__}, "
                "which is not JSON-compatible"
            ) from None
    for name, item in value.items():
        _check_keys(name, item)  # after json.dumps: no circular reference left
    # Tuples become lists (what JSON gives back), so that equal-looking
    # values have one form: the prepared-context cache keys by canonical JSON.
    return types.MappingProxyType({name: _normalised(item) for name, item in value.items()})


def _check_keys(name: str, item: object) -> None:
    """Raise unless every mapping inside ``item`` has str keys.

    A non-str key would be turned into a string by JSON ({1: "a"} and
    {"1": "a"} would share a cache key) and fail in the driver, a 500.
    """
    if isinstance(item, Mapping):
        for key, sub in item.items():
            if not isinstance(key, str):
                raise IdentityError(
                    f"attribute {name!r} holds a mapping with a key of type "
                    f"{type(key).__name__}; keys must be strings at every level"
                )
            _check_keys(name, sub)
    elif isinstance(item, (list, tuple)):
        for sub in item:
            _check_keys(name, sub)


def _normalised(item: Any) -> Any:
    """A deep copy of a checked value, with tuples as lists and mappings as dicts."""
    if isinstance(item, Mapping):
        return {key: _normalised(sub) for key, sub in item.items()}
    if isinstance(item, (list, tuple)):
        return [_normalised(sub) for sub in item]
    return copy.deepcopy(item)


def _same_value(a: object, b: object) -> bool:
    """Equal *and* of the same types throughout (True == 1 == 1.0, but not here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _same_attributes(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    # Type-strict: {"clearance": True} and {"clearance": 1} are different
    # end-user contexts (the database sees true and 1).
    if a is None or b is None:
        return a is b
    return _same_value(dict(a), dict(b))


def _check_roles_with_local_user(
    identity: Identity | None, data_roles: tuple[str, ...] | None
) -> None:
    # The database rejects explicit data roles for a local (name, key) end
    # user; say so now rather than on the next round trip.
    if isinstance(identity, tuple) and data_roles:
        raise IdentityError(
            "data roles cannot be set explicitly for a local (name, key) end user; "
            "the database grants them from the user's own roles"
        )
