"""The signed end-user header of a Celery message.

Whoever can write to the broker can write any message header.  So the end user
travels as canonical JSON with an HMAC-SHA256 over (format version, task id,
task name, end user): a changed end user, a header copied onto another message
(another task id or task name) or one signed with another key never verifies.
"No end user" is signed too, so a header that is simply missing is told apart
from a publisher that had none.  Reasons for refusal never quote the header:
it holds the end user's token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from ..context import EndUserContext
from ..errors import IdentityError

__all__ = [
    "HEADER",
    "MIN_KEY_BYTES",
    "HeaderRefused",
    "derive_key",
    "sign",
    "verify",
]

#: The message header that carries the end user.
HEADER = "deepsec_end_user"
#: Shortest signing key accepted (bytes of the UTF-8 encoding).
MIN_KEY_BYTES = 16
_VERSION = 1
# Key separation: the app's key (often Django's SECRET_KEY) is never used as
# is, so a MAC made here is useless anywhere else and vice versa.
_PURPOSE = b"deepsec.celery.end_user.v1"
# Far above any real end user (an identity is at most 65535 characters); a
# bigger header is refused before any parsing.
_MAX_HEADER_CHARS = 512 * 1024


class HeaderRefused(Exception):
    """The header does not carry a trustworthy end user; ``str()`` says why (no secret)."""


def derive_key(signing_key: str | bytes) -> bytes:
    """The MAC key used for end-user headers, derived from the app's signing key."""
    raw = signing_key.encode("utf-8") if isinstance(signing_key, str) else bytes(signing_key)
    return hmac.new(raw, _PURPOSE, hashlib.sha256).digest()


def _canonical(value: object) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _encode_end_user(ctx: EndUserContext | None) -> str:
    if ctx is None or ctx.identity is None:
        return "null"
    identity = list(ctx.identity) if isinstance(ctx.identity, tuple) else ctx.identity
    return _canonical(
        {
            "identity": identity,
            "data_roles": None if ctx.data_roles is None else list(ctx.data_roles),
            "attributes": None if ctx.attributes is None else dict(ctx.attributes),
        }
    )


def _mac(key: bytes, task_id: str, task_name: str, end_user: str) -> str:
    # A JSON array is an unambiguous encoding of the four fields.
    signed = _canonical([_VERSION, task_id, task_name, end_user]).encode("ascii")
    return hmac.new(key, signed, hashlib.sha256).hexdigest()


def sign(key: bytes, task_id: str, task_name: str, ctx: EndUserContext | None) -> dict[str, Any]:
    """The header value for one message: ``ctx`` (or no end user), bound to it."""
    end_user = _encode_end_user(ctx)
    return {
        "v": _VERSION,
        "id": task_id,
        "task": task_name,
        "end_user": end_user,
        "sig": _mac(key, task_id, task_name, end_user),
    }


def verify(key: bytes, header: object, task_id: str, task_name: str) -> EndUserContext | None:
    """The end user a header carries for this message (``None``: signed "no end user").

    Raises:
        HeaderRefused: missing, malformed, unsigned, tampered, signed with
            another key, or made for another message.
    """
    if header is None:
        raise HeaderRefused("is missing")
    if not isinstance(header, dict):
        raise HeaderRefused("is malformed")
    end_user, sig = header.get("end_user"), header.get("sig")
    if header.get("v") != _VERSION:
        raise HeaderRefused("has an unknown format version")
    if not isinstance(end_user, str) or len(end_user) > _MAX_HEADER_CHARS:
        raise HeaderRefused("is malformed")
    if not isinstance(sig, str) or not sig:
        raise HeaderRefused("is not signed")
    if len(sig) != 64 or not sig.isascii():  # compare_digest() refuses non-ASCII str
        raise HeaderRefused("has a bad signature (tampered with, or signed with another key)")
    expected = _mac(key, task_id, task_name, end_user)
    if not hmac.compare_digest(expected, sig):
        if header.get("id") != task_id or header.get("task") != task_name:
            raise HeaderRefused("was made for another message")
        raise HeaderRefused("has a bad signature (tampered with, or signed with another key)")
    return _decode_end_user(end_user)


def _decode_end_user(end_user: str) -> EndUserContext | None:
    try:
        data = json.loads(end_user)
        if data is None:
            return None
        if not isinstance(data, dict) or set(data) != {"identity", "data_roles", "attributes"}:
            raise ValueError("unexpected fields")
        return EndUserContext(data["identity"], data["data_roles"], data["attributes"])
    except (ValueError, TypeError, IdentityError):
        # Signed by a holder of the key, yet not an end user: a bug or a
        # version mismatch, never something to guess at.
        raise HeaderRefused("is signed but holds no valid end user") from None
