"""The one decoder of a JWT's payload claims, **without** verifying anything.

deepsec never trusts these claims for a security decision: the database
verifies every token.  They serve the token cache (``exp``: when to refresh),
``doctor`` (what a token says, never the token itself) and the wire test
server (which end user a context names).  Input may be hostile (a request's
identity cookie), so size and JSON nesting are bounded before parsing, and
anything malformed gives ``None`` rather than an exception.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_TOKEN_CHARS", "decode_claims", "expiry"]

#: Longer tokens are not decoded (real access tokens are a few kilobytes).
MAX_TOKEN_CHARS = 64 * 1024
#: Deeper JSON nesting in the payload is refused (claims are nearly flat).
MAX_DEPTH = 32


def _depth_ok(text: str, limit: int) -> bool:
    """Whether the JSON text nests arrays/objects at most ``limit`` deep (strings skipped)."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def decode_claims(token: object) -> dict[str, Any] | None:
    """The claims of a compact JWS (``header.payload.signature``), unverified.

    Returns ``None`` for anything else: not a string, too long, not three
    parts, bad base64url, not UTF-8 JSON, nested deeper than
    :data:`MAX_DEPTH`, or a payload that is not a JSON object.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        return None
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    payload = parts[1]
    try:
        text = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode("utf-8")
        if not _depth_ok(text, MAX_DEPTH):
            return None
        claims = json.loads(text)
    except (ValueError, binascii.Error, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None


def expiry(token: object) -> float | None:
    """The numeric ``exp`` claim (epoch seconds), or ``None`` if absent or not a JWT."""
    claims = decode_claims(token)
    exp = None if claims is None else claims.get("exp")
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
