"""Parsers for identity input from a request: bounded, strict, never raising anything else.

Every function here raises :class:`MalformedIdentity` (a message describing
the problem, never the value) for input it cannot accept; what the adapters
do with that -- "no identity" or 400/401 -- is :mod:`deepsec.web`'s policy.
Re-exported by :mod:`deepsec.web`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from urllib.parse import unquote

from ._validation import Identity, validate_identity
from .errors import DeepSecError, IdentityError

__all__ = [
    "COOKIE_HEADER_FACTOR",
    "COOKIE_JOIN",
    "DEFAULT_MAX_SIZE",
    "MalformedIdentity",
    "cookie_pairs",
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
# A JSON escape (backslash and the next character), then a JSON string literal
# once escapes are gone; what is left of a value once both are removed holds
# the value's structure, whose nesting we bound before json.loads sees it.
# Two linear passes: one regex for both (``"(?:[^"\\]|\\.)*"``) restarts
# at every escaped quote of an unterminated string, quadratic in its length.
_JSON_ESCAPE = re.compile(r"\\.", re.DOTALL)
_JSON_STRING = re.compile(r'"[^"]*"')
_JSON_DECODER = json.JSONDecoder()


def _cookie_unescape(m: re.Match[str]) -> str:
    if m.group(1) is None:
        return m.group(2)
    code = int(m.group(1), 8)
    if code >= 0o200:
        # http.cookies reads \303\251 as two code points, werkzeug as the UTF-8
        # bytes of one: the same bytes would name two users.  Ambiguity is malformed.
        raise MalformedIdentity("identity cookie has an octal escape above \\177")
    return chr(code)


def _unquote_cookie(inner: str) -> str:
    return _COOKIE_ESCAPE.sub(_cookie_unescape, inner)


def _load_json(value: str) -> object:
    """``json.loads`` for an identity: a string or a flat list, nothing deeper.

    The valid forms nest one level at most, so a deeper value (1,000 ``[``
    would raise RecursionError inside json) is refused before parsing.
    """
    structure = _JSON_STRING.sub("", _JSON_ESCAPE.sub("", value))
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
    identity = _decode_cookie(value)
    if "," in value and _decode_cookie(value.replace(",", ", ")) != identity:
        # Servers join repeated Cookie fields with "," (gunicorn, werkzeug,
        # Django) or ", " (waitress): a literal comma inside a name or key
        # may be such a join, and would name different users on different
        # servers.  Writers escape it (\054, %2C); ambiguity is malformed.
        raise MalformedIdentity("identity cookie: a literal comma inside a name or key")
    return identity


def _decode_cookie(value: str) -> Identity | None:
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
# Cookie fields with "," (gunicorn, werkzeug, Django under ASGI, waitress), by
# a "," before the next name=.  A comma inside a value (["bob", null]) is not
# followed by one.  Split on ";" with str.split and on such commas with a
# pattern that starts at the comma: a leading \s* would retry every space of
# a long run (quadratic: a 40 KB header froze an event loop for seconds).
_COOKIE_COMMA = re.compile(r",(?=[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+=)")
#: How many times ``max_size`` a whole Cookie header may be (other cookies
#: included) before it is refused as malformed, unparsed.
COOKIE_HEADER_FACTOR = 8
#: How repeated Cookie fields are joined, as gunicorn, werkzeug and Django
#: under ASGI join them (waitress adds a space, which JSON ignores): the
#: same bytes name the same end user whichever server delivers them.
COOKIE_JOIN = ","


def parse_cookie_header(
    header: str | Sequence[str] | None, name: str, *, max_size: int = DEFAULT_MAX_SIZE
) -> str | None:
    """The value of cookie ``name`` in the raw ``Cookie`` header(s), or ``None``.

    ``header`` is the field, or all its values when it was sent more than
    once (joined with :data:`COOKIE_JOIN`).  The same cookie given twice with
    different values is ambiguous.

    Raises:
        MalformedIdentity: (status 400) ``name`` has more than one value, or
            the header is larger than ``COOKIE_HEADER_FACTOR * max_size``.
    """
    if not header:
        return None
    if not isinstance(header, str):
        header = COOKIE_JOIN.join(header)
    if name not in header:
        return None
    if len(header) > COOKIE_HEADER_FACTOR * max_size:
        raise MalformedIdentity(
            f"Cookie header is larger than {COOKIE_HEADER_FACTOR * max_size} bytes"
        )
    found: str | None = None
    for key, value in cookie_pairs(header):
        if key == name:
            if found is not None and value != found:
                raise MalformedIdentity(f"the {name!r} cookie was sent more than once")
            found = value
    return found


def cookie_pairs(header: str) -> Iterator[tuple[str, str]]:
    """``(name, value)`` of each cookie in a Cookie header, stripped, in order.

    Linear in the header's length.  A quoted RFC 6265 value stays quoted.
    """
    for pair in header.split(";"):
        for part in _COOKIE_COMMA.split(pair) if "," in pair else (pair,):
            key, sep, value = part.partition("=")
            if sep:
                yield key.strip(), value.strip()


def from_wire(value: str) -> str:
    """Header text as servers hand it over (bytes as latin-1) -> the UTF-8 it encodes."""
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise MalformedIdentity("identity cookie is not valid UTF-8") from None
