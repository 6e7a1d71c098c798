"""Parsers for identity input from a request: bounded, strict, never raising anything else.

Every function here raises :class:`MalformedIdentity` (a message describing
the problem, never the value) for input it cannot accept; what the adapters
do with that -- "no identity" or 400/401 -- is :mod:`deepsec.web`'s policy.
Re-exported by :mod:`deepsec.web`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from urllib.parse import unquote

from .context import Identity, validate_identity
from .errors import DeepSecError, IdentityError

__all__ = [
    "DEFAULT_MAX_SIZE",
    "MalformedIdentity",
    "from_wire",
    "identity_from_authorization",
    "identity_from_cookie",
    "parse_cookie_header",
]

DEFAULT_MAX_SIZE = 16 * 1024

# RFC 6750 b64token: the characters a bearer token may contain.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class MalformedIdentity(DeepSecError):
    """The request carried an identity we cannot parse.

    ``status`` is 400 for bad syntax in a cookie, 401 for a bad bearer token.
    The message describes the problem, never the value.
    """

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _size_ok(value: str, max_size: int) -> bool:
    return len(value) <= max_size and len(value.encode("utf-8", "surrogatepass")) <= max_size


_COOKIE_ESCAPE = re.compile(r"\\(?:([0-3][0-7][0-7])|(.))")
# A JSON string literal; what is left of a value once they are removed holds
# the value's structure, whose nesting we bound before json.loads sees it.
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_DECODER = json.JSONDecoder()


def _unquote_cookie(inner: str) -> str:
    return _COOKIE_ESCAPE.sub(
        lambda m: chr(int(m.group(1), 8)) if m.group(1) else m.group(2), inner
    )


def _load_json(value: str) -> object:
    """``json.loads`` for an identity: a string or a flat list, nothing deeper.

    The valid forms nest one level at most, so a deeper value (1,000 ``[``
    would raise RecursionError inside json) is refused before parsing.
    """
    structure = _JSON_STRING.sub("", value)
    if structure.count("[") + structure.count("{") > 1:
        raise MalformedIdentity("identity cookie is nested too deeply")
    try:
        return _JSON_DECODER.decode(value)
    except ValueError:  # also int too large to convert (CVE-2020-10735 limit)
        raise MalformedIdentity("identity cookie is not valid JSON") from None


def _check_text(value: str, what: str) -> None:
    # Lone surrogates, control and other non-printable characters never name
    # a real end user, and some (a surrogate) cannot even be encoded for the
    # database: refuse them here, not as a 500 at the first statement.
    if not value.isprintable():
        raise MalformedIdentity(f"identity cookie: {what} has non-printable characters")


def identity_from_cookie(value: str | None, *, max_size: int = DEFAULT_MAX_SIZE) -> Identity | None:
    """Parse the ``identity`` cookie value.

    A JSON string is a token, JSON ``[name, key|null]`` a local end user, a
    bare value a token.  Percent-encoded JSON (``%5B...``, ``%22...``, UTF-8)
    and the backslash-escaped quoted form that ``http.cookies`` and werkzeug
    write (``"[\\"bob\\"\\054 null]"``) are decoded first.

    Raises:
        MalformedIdentity: the value is oversized, nested, not one of those
            forms, or names a user with non-printable characters.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if not _size_ok(value, max_size):
        raise MalformedIdentity(f"identity cookie is larger than {max_size} bytes")
    if value[:3].upper() in ("%5B", "%22"):
        try:
            value = unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise MalformedIdentity("identity cookie is not valid percent-encoded UTF-8") from None
    elif len(value) >= 2 and value[0] == value[-1] == '"' and "\\" in value:
        # An RFC 2109 quoted-string, as http.cookies and werkzeug write a value
        # with commas or spaces: '"[\\"bob\\"\\054 null]"' is ["bob", null].
        value = _unquote_cookie(value[1:-1])
    if not value:
        raise MalformedIdentity("identity cookie is empty once decoded")
    if value[0] in '["{':
        decoded = _load_json(value)
        if isinstance(decoded, str):
            if not _B64TOKEN.fullmatch(decoded):
                raise MalformedIdentity("identity cookie holds a string that is not a token")
            return decoded
        if not isinstance(decoded, list):
            raise MalformedIdentity(
                "identity cookie must be a JSON string (token) or [name, key|null]"
            )
        try:
            identity = validate_identity(decoded)
        except (TypeError, IdentityError) as exc:
            raise MalformedIdentity(f"identity cookie: {exc}") from None
        if isinstance(identity, tuple):
            _check_text(identity[0], "the name")
            if identity[1] is not None:
                _check_text(identity[1], "the key")
        return identity
    if not _B64TOKEN.fullmatch(value):
        raise MalformedIdentity("identity cookie is neither JSON nor a token")
    return value


def identity_from_authorization(
    value: str | Sequence[str] | None, *, max_size: int = DEFAULT_MAX_SIZE
) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``.

    ``value`` is the header, or all its values when it was sent more than once
    (a server that joins them with ``,`` gives the same answer).  Other
    schemes (``Basic``...) are not ours and give ``None``.

    Raises:
        MalformedIdentity: (status 401) a Bearer credential with a bad or
            oversized token, or one among several credentials (ambiguous).
    """
    if value is None:
        return None
    if not isinstance(value, str):
        if not value:
            return None
        value = ", ".join(value)
    if not _size_ok(value, max_size + 7):
        raise MalformedIdentity(f"Authorization header is larger than {max_size} bytes", status=401)
    if "," in value:
        # Several credentials (repeated fields, joined by the server or by us).
        # Which one the client meant is a guess: a Bearer among them is
        # ambiguous, and ambiguity is malformed.
        parts = value.split(",")
        if any(p.strip().partition(" ")[0].lower() == "bearer" for p in parts):
            raise MalformedIdentity(
                "Authorization holds a Bearer token among several credentials", status=401
            )
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    if not token or not _B64TOKEN.fullmatch(token):
        raise MalformedIdentity("Authorization: Bearer token is malformed", status=401)
    return token


# Cookie pairs are separated by ";" and, where a server joined repeated
# Cookie fields with "," (waitress, Django under ASGI), by a "," before the
# next name=.  A comma inside a value (["bob", null]) is not followed by one.
_COOKIE_SEPARATOR = re.compile(r"\s*;\s*|\s*,\s*(?=[!#$%&'*+\-.^_`|~0-9A-Za-z]+=)")


def parse_cookie_header(header: str | Sequence[str] | None, name: str) -> str | None:
    """The value of cookie ``name`` in the raw ``Cookie`` header(s), or ``None``.

    ``header`` is the field, or all its values when it was sent more than
    once.  The same cookie given twice with different values is ambiguous.

    Raises:
        MalformedIdentity: (status 400) ``name`` has more than one value.
    """
    if not header:
        return None
    if not isinstance(header, str):
        header = "; ".join(header)
    if name not in header:
        return None
    found: str | None = None
    for part in _COOKIE_SEPARATOR.split(header):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            # A quoted RFC 6265 value stays quoted: it then parses as a JSON string.
            value = value.strip()
            if found is not None and value != found:
                raise MalformedIdentity(f"the {name!r} cookie was sent more than once")
            found = value
    return found


def from_wire(value: str) -> str:
    """Header text as servers hand it over (bytes as latin-1) -> the UTF-8 it encodes."""
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise MalformedIdentity("identity cookie is not valid UTF-8") from None
