"""O5LOGON with the 12c (PBKDF2-SHA512) verifier, server side."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from .messages import _STATUS_OK, _params

# ---------------------------------------------------------------------------
# O5LOGON (12c verifier), server side
# ---------------------------------------------------------------------------


def _aes_cbc(key: bytes, data: bytes, encrypt: bool) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.CBC(bytes(16)))
    ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    return ctx.update(data) + ctx.finalize()


def _pbkdf2(key: bytes, salt: bytes, length: int, iterations: int) -> bytes:
    kdf = PBKDF2HMAC(algorithm=hashes.SHA512(), salt=salt, length=length, iterations=iterations)
    return kdf.derive(key)


class _O5Logon:
    """Server half of O5LOGON with the 12c (PBKDF2-SHA512) verifier."""

    VGEN_COUNT = 4096
    SDER_COUNT = 3

    def __init__(self, password: str | None) -> None:
        # unknown users get a random verifier, so they fail only in phase two
        self.password = password
        secret = (password if password is not None else secrets.token_hex(16)).encode()
        self.salt = secrets.token_bytes(16)
        self.csk_salt = secrets.token_bytes(16)
        self.server_part = secrets.token_bytes(32)
        speedy = _pbkdf2(secret, self.salt + b"AUTH_PBKDF2_SPEEDY_KEY", 64, self.VGEN_COUNT)
        self.pw_hash = hashlib.sha512(speedy + self.salt).digest()[:32]
        self.combo_key = b""

    def phase_one(self) -> bytes:
        sesskey = _aes_cbc(self.pw_hash, self.server_part, True).hex().upper()
        return (
            _params(
                [
                    ("AUTH_SESSKEY", sesskey, 0),
                    ("AUTH_VFR_DATA", self.salt.hex().upper(), 0x4815),
                    ("AUTH_PBKDF2_CSK_SALT", self.csk_salt.hex().upper(), 0),
                    ("AUTH_PBKDF2_VGEN_COUNT", str(self.VGEN_COUNT), 0),
                    ("AUTH_PBKDF2_SDER_COUNT", str(self.SDER_COUNT), 0),
                ]
            )
            + _STATUS_OK
        )

    def check(self, pairs: Mapping[str, str]) -> bool:
        """Verify phase two's AUTH_SESSKEY/AUTH_PASSWORD; sets :attr:`combo_key`."""
        try:
            client_part = _aes_cbc(self.pw_hash, bytes.fromhex(pairs["AUTH_SESSKEY"])[:32], False)
            self.combo_key = _pbkdf2(
                (client_part[:32] + self.server_part).hex().upper().encode(),
                self.csk_salt,
                32,
                self.SDER_COUNT,
            )
            plain = _aes_cbc(self.combo_key, bytes.fromhex(pairs["AUTH_PASSWORD"]), False)
        except (KeyError, ValueError):
            return False
        pad = plain[-1] if plain else 0
        if not 0 < pad <= 16:
            return False
        candidate = plain[16:-pad]
        return self.password is not None and secrets.compare_digest(
            candidate, self.password.encode()
        )

    def server_response(self) -> str:
        block = secrets.token_bytes(16) + b"SERVER_TO_CLIENT"
        padded = block + bytes([16]) * 16
        return _aes_cbc(self.combo_key, padded, True).hex().upper()
