"""The signed end-user header of a Celery message.

Whoever can write to the broker can write any message, headers and body.  So
the end user travels as canonical JSON with an HMAC-SHA256 over (format
version, task id, task name, a digest of the message body, issue time, end
user).  The body digest covers the arguments *and* the follow-up tasks Celery
keeps in the body (``chain``, ``callbacks``/``link``, ``errbacks``/
``link_error``, ``chord``): the worker publishes those inside the task's
scope, so a header that did not cover them would sign whatever a broker
writer put there.  A changed end user or body, a header copied onto another
message, one older than the maximum age, or one signed with another key never
verifies.  "No end user" is signed too, so a missing header is told apart
from a publisher that had none.  Reasons for refusal never quote the header:
it holds the end user's token.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import hmac
import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

from ..context import EndUserContext
from ..errors import IdentityError

__all__ = [
    "CLOCK_SKEW",
    "EMBED_KEYS",
    "HEADER",
    "MIN_KEY_BYTES",
    "HeaderRefused",
    "body_digest",
    "derive_key",
    "sign",
    "verify",
]

#: The message header that carries the end user.
HEADER = "deepsec_end_user"
#: Shortest signing key accepted (bytes of the UTF-8 encoding).
MIN_KEY_BYTES = 16
#: Seconds of clock difference tolerated between publisher, worker and token
#: issuer (issue times in the future, maximum age, token ``exp``).
CLOCK_SKEW = 60
#: The follow-up tasks Celery keeps in a message body (protocol 2 "embed").
EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")
_VERSION = 2
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


def _plain(value: object) -> object:
    """``value`` as plain JSON data, the same before and after a serializer round trip.

    Tuples become lists and mapping keys strings (as JSON and msgpack do);
    the types kombu's JSON serializer round-trips become their text.  Any
    other type cannot be covered, so it is refused rather than guessed at.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        # JSON carries NaN/Infinity as bare words; keep them apart from strings.
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, decimal.Decimal)):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": bytes(value).hex()}
    raise TypeError(
        f"a task argument or follow-up task holds a value of type {type(value).__name__}, "
        "which deepsec.celery cannot sign; use JSON-compatible values"
    )


def body_digest(args: Any, kwargs: Any, embed: Mapping[str, Any] | None) -> str:
    """SHA-256 of a message body (args, kwargs, follow-up tasks) in canonical form.

    Computed from the body as published (``before_task_publish``) and from
    the decoded request on the worker; both give the same text.

    Raises:
        TypeError: the body holds a value that has no canonical form.
    """
    embed = embed or {}
    plain = [
        _plain(list(args or ())),
        _plain(dict(kwargs or {})),
        {name: _plain(embed.get(name)) for name in EMBED_KEYS},
    ]
    text = _canonical(plain)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


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


def _mac(
    key: bytes,
    task_id: str,
    task_name: str,
    body: str,
    issued_at: int,
    tainted: bool,
    end_user: str,
) -> str:
    # A JSON array is an unambiguous encoding of the fields.
    signed = _canonical([_VERSION, task_id, task_name, body, issued_at, tainted, end_user])
    return hmac.new(key, signed.encode("ascii"), hashlib.sha256).hexdigest()


def sign(
    key: bytes,
    task_id: str,
    task_name: str,
    ctx: EndUserContext | None,
    body: str,
    issued_at: float,
    *,
    tainted: bool = False,
) -> dict[str, Any]:
    """The header value for one message: ``ctx`` (or no end user), bound to it.

    ``body`` is :func:`body_digest` of the message.  ``tainted`` marks a
    message published by a task whose own header was refused or whose end
    user had expired: it carries no end user and is refused on arrival, so
    such a task cannot launder what it publishes into a trusted message.

    Raises:
        ValueError, TypeError: ``ctx`` cannot be encoded (never with a
            validated context).
    """
    end_user = "null" if tainted else _encode_end_user(ctx)
    iat = int(issued_at)
    return {
        "v": _VERSION,
        "id": task_id,
        "task": task_name,
        "body": body,
        "iat": iat,
        "tainted": tainted,
        "end_user": end_user,
        "sig": _mac(key, task_id, task_name, body, iat, tainted, end_user),
    }


def verify(
    key: bytes,
    header: object,
    task_id: str,
    task_name: str,
    body: str,
    *,
    now: float,
    max_age: float,
) -> EndUserContext | None:
    """The end user a header carries for this message (``None``: signed "no end user").

    ``body`` is :func:`body_digest` of the message as the worker decoded it.

    Raises:
        HeaderRefused: missing, malformed, unsigned, tampered, signed with
            another key, made for another message or body, issued more than
            ``max_age`` seconds ago (or in the future), or tainted.
    """
    if header is None:
        raise HeaderRefused("is missing")
    if not isinstance(header, dict):
        raise HeaderRefused("is malformed")
    if header.get("v") != _VERSION:
        raise HeaderRefused("has an unknown format version")
    end_user, sig, iat = header.get("end_user"), header.get("sig"), header.get("iat")
    tainted = header.get("tainted")
    if (
        not isinstance(end_user, str)
        or len(end_user) > _MAX_HEADER_CHARS
        or not isinstance(iat, int)
        or isinstance(iat, bool)
        or not isinstance(tainted, bool)
    ):
        raise HeaderRefused("is malformed")
    if not isinstance(sig, str) or not sig:
        raise HeaderRefused("is not signed")
    if len(sig) != 64 or not sig.isascii():  # compare_digest() refuses non-ASCII str
        raise HeaderRefused("has a bad signature (tampered with, or signed with another key)")
    expected = _mac(key, task_id, task_name, body, iat, tainted, end_user)
    if not hmac.compare_digest(expected, sig):
        if header.get("id") != task_id or header.get("task") != task_name:
            raise HeaderRefused("was made for another message")
        if header.get("body") != body:
            raise HeaderRefused(
                "does not match the message body (arguments or follow-up tasks changed)"
            )
        raise HeaderRefused("has a bad signature (tampered with, or signed with another key)")
    # Signed by a holder of the key: the fields below are the publisher's.
    if tainted:
        raise HeaderRefused("was published by a task whose own end user was refused")
    if iat > now + CLOCK_SKEW:
        raise HeaderRefused("was issued in the future (check the clocks)")
    if now - iat > max_age + CLOCK_SKEW:
        raise HeaderRefused(f"is older than the maximum age ({max_age:g} s)")
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
