"""Token-cache keys that hold no secret.

Every :class:`~deepsec.tokens.cache.TokenCache` key is a sha256 hex digest
built by :func:`cache_key`, never a raw client secret or user token (keys
show up in logs and, hashed again, in Redis).  :class:`KeyMemo` saves
re-hashing the same identity object before every database operation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

__all__ = ["KeyMemo", "cache_key"]


def cache_key(*parts: object) -> str:
    """A cache key for ``parts`` that holds no secret: a sha256 hex digest.

    Each part is length-prefixed with its type name, so ``("ab", "c")`` and
    ``("a", "bc")`` differ, as do ``1`` and ``"1"``.
    """
    h = hashlib.sha256()
    for part in parts:
        raw = part.encode() if isinstance(part, str) else repr(part).encode()
        h.update(f"{type(part).__name__}:{len(raw)}:".encode())
        h.update(raw)
    return h.hexdigest()


class KeyMemo:
    """Remembers the cache key derived from recently seen identity objects.

    Deriving a key hashes the identity (a user token can be kilobytes: a few
    microseconds), and ``cached_token`` runs before every database operation.
    The memo is keyed by ``id(obj)`` and checked with ``is``: each entry keeps
    its object alive, so the id cannot be reused by another object while the
    entry exists, and identities (``str`` or tuples of ``str``) are immutable.
    Bounded: cleared when ``maxsize`` is reached.
    """

    __slots__ = ("_data", "_derive", "_maxsize")

    def __init__(self, derive: Callable[[Any], str], maxsize: int = 4096) -> None:
        self._derive = derive
        self._maxsize = maxsize
        self._data: dict[int, tuple[object, str]] = {}

    def key(self, obj: object) -> str:
        """The key for ``obj`` (derived once per object while remembered)."""
        hit = self._data.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        key = self._derive(obj)
        if len(self._data) >= self._maxsize:
            self._data.clear()
        self._data[id(obj)] = (obj, key)
        return key
