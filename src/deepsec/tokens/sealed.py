"""Sealing tokens for the shared (Redis) cache: AES-256-GCM, HKDF-SHA256 keys.

Nothing stored in Redis may reveal a token, a secret or an identity:

* an entry's **name** is ``deepsec:tok:v1:`` plus an HMAC-SHA256 (under a
  name key derived from the cache key) of the in-process cache key, itself a
  sha256 of the token settings (``EndUserSecConfig.token_fingerprint``: never
  the Redis URL, ``timeout`` or ``cache_size``) and the identity.  Without the
  key nobody can even test a guess ("is alice's entry there?");
* an entry's **value** is ``version || nonce || AES-GCM(token, expiry)``
  (the expiry is when its writer stops serving it: the safety margin applied)
  with the entry's name as associated data, so a value copied under another
  user's name does not open.  A value that does not open (another key,
  tampering, a copy) is a miss, never an error and never a wrong token.

The key is ``token_cache_key`` when given, else derived with HKDF-SHA256 from
the client credential and client id, so every instance of one application
agrees on it with no new setting.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from ..config import EndUserSecConfig

__all__ = ["ENTRY_PREFIX", "LOCK_PREFIX", "Opened", "Sealer", "cache_secret"]

#: Versioned prefixes: a format change gets new names, never a misread.
ENTRY_PREFIX = "deepsec:tok:v1:"
LOCK_PREFIX = "deepsec:lock:v1:"
_VERSION = b"\x01"
_NONCE = 12
# HKDF salt and labels: fixed and public, they only separate uses of one secret.
_SALT = b"deepsec shared token cache v1"


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(secret)


def cache_secret(config: EndUserSecConfig) -> bytes:
    """The 32-byte root key of ``config``'s shared cache.

    ``token_cache_key`` when set; else HKDF-SHA256 of the client credential,
    bound to the client id, so instances of one app agree and another app (a
    different credential) shares nothing with it.  Config parsing already
    refused a ``token_cache`` with neither.
    """
    if config.token_cache_key is not None:
        return config.token_cache_key
    credential = config.client_credential
    if isinstance(credential, Mapping):
        material = json.dumps(dict(credential), sort_keys=True, default=str).encode()
    elif isinstance(credential, str) and credential:
        material = credential.encode()
    else:  # pragma: no cover - parse_end_user_sec_params refuses this config
        raise ValueError("token_cache needs token_cache_key or a client credential")
    return _hkdf(material, b"root|" + (config.client_id or "").encode())


class Opened(NamedTuple):
    """A token read back from the shared cache."""

    token: str
    expires_at: float
    exact: bool


class Sealer:
    """Names and seals entries under one root key (see the module docstring)."""

    __slots__ = ("_aead", "_name_key")

    def __init__(self, secret: bytes) -> None:
        # Separate subkeys: the name HMAC never uses the encryption key.
        self._aead = AESGCM(_hkdf(secret, b"entry encryption"))
        self._name_key = _hkdf(secret, b"entry names")

    def __repr__(self) -> str:
        return "Sealer(<key not shown>)"

    def digest(self, cache_key: str) -> str:
        """The keyed digest naming ``cache_key``'s entry and lock."""
        return hmac.new(self._name_key, cache_key.encode(), hashlib.sha256).hexdigest()

    def seal(self, name: str, token: str, expires_at: float, exact: bool) -> bytes:
        """The stored value for ``token`` under entry ``name``."""
        plain = json.dumps({"t": token, "e": expires_at, "x": exact}, separators=(",", ":"))
        nonce = os.urandom(_NONCE)
        return _VERSION + nonce + self._aead.encrypt(nonce, plain.encode(), name.encode())

    def open(self, name: str, blob: object) -> Opened | None:
        """The entry in ``blob`` if it was sealed by this key for ``name``, else ``None``."""
        if not isinstance(blob, bytes) or len(blob) < 1 + _NONCE + 16 or blob[:1] != _VERSION:
            return None
        try:
            plain = self._aead.decrypt(blob[1 : 1 + _NONCE], blob[1 + _NONCE :], name.encode())
            data = json.loads(plain)
            token, expires_at, exact = data["t"], data["e"], data["x"]
        except (InvalidTag, ValueError, KeyError, TypeError):
            return None
        if (
            not isinstance(token, str)
            or not token
            or isinstance(expires_at, bool)
            or not isinstance(expires_at, (int, float))
            or not isinstance(exact, bool)
        ):
            return None
        return Opened(token, float(expires_at), exact)
