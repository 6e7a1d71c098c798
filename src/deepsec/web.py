"""What every web adapter shares: identity from a request, policies, rejections.

Adapters (``deepsec.django``, ``deepsec.flask``, ``deepsec.asgi``,
``deepsec.fastapi``) only pull raw values out of their framework's request —
the ``identity`` cookie, the ``Authorization`` header — and hand them, with
the request object, to :func:`resolve`.  Everything else lives here once:

* order: the app's ``resolver(request)``; else the cookie; else
  ``Authorization: Bearer <token>`` (scheme case-insensitive);
* cookie values: a JSON string is a token, JSON ``[name, key|null]`` a local
  end user, a bare (non-JSON) value a token;
* strict parsing with a size limit; malformed input is *no identity* (one
  WARNING log record, never the value) or, with ``strict=True``, HTTP 400/401;
* the ``no_identity`` policy: ``least_privilege`` (default) or ``deny`` (401);
* the response for a token-acquisition failure (503 by default).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

import oracledb

from .context import EndUserContext, Identity, validate_identity
from .errors import (
    USER_TOKEN_REJECTED,
    ConfigError,
    DeepSecError,
    IdentityError,
    IdentityNotAccepted,
    TokenAcquisitionError,
    TokenNotReadyError,
)

__all__ = [
    "DEFAULT_MAX_SIZE",
    "MalformedIdentity",
    "Rejection",
    "Resolution",
    "WebSettings",
    "identity_from_authorization",
    "identity_from_cookie",
    "parse_cookie_header",
    "rejection_for_error",
    "resolve",
]

log = logging.getLogger("deepsec.web")

DEFAULT_MAX_SIZE = 16 * 1024
NoIdentityPolicy = Literal["least_privilege", "deny"]
#: ``resolver(request)`` returns an identity, a full context, or ``None``.
Resolver = Callable[[Any], "Identity | EndUserContext | list[Any] | None"]

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


@dataclass(frozen=True)
class Rejection:
    """An HTTP response an adapter sends instead of running the app."""

    status: int
    body: dict[str, str]
    headers: tuple[tuple[str, str], ...] = ()

    def json_body(self) -> bytes:
        """The body as compact UTF-8 JSON."""
        return json.dumps(self.body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Resolution:
    """The outcome of :func:`resolve`: a context to activate, or a rejection."""

    context: EndUserContext | None = None
    rejection: Rejection | None = None


@dataclass(frozen=True)
class WebSettings:
    """Adapter settings, shared by all frameworks.

    Attributes:
        cookie_name: cookie holding the identity (``None`` disables cookies).
        bearer: read ``Authorization: Bearer <token>``.
        resolver: ``resolver(request)`` -> identity, :class:`EndUserContext`
            or ``None``; when set, the cookie and header are not read.
        data_roles: ``data_roles(request)`` -> list of role names or ``None``.
        attributes: ``attributes(request)`` -> dict or ``None``.
        max_size: largest cookie or header value accepted, in bytes.
        strict: reject malformed identities with 400/401 instead of
            treating them as absent.
        client_local_users: accept a local ``[name, key|null]`` end user
            from the client's cookie.  Off by default: nothing authenticates
            a keyless local user, so any client could claim any of them; get
            local users from a ``resolver`` built on your own authentication
            (``deepsec.django.resolvers.django_user``) instead.
        no_identity: ``least_privilege`` runs the request with no end user;
            ``deny`` answers 401.
        token_error_status: status for a token-acquisition failure.
    """

    cookie_name: str | None = "identity"
    bearer: bool = True
    resolver: Resolver | None = None
    data_roles: Callable[[Any], Sequence[str] | None] | None = None
    attributes: Callable[[Any], Mapping[str, Any] | None] | None = None
    max_size: int = DEFAULT_MAX_SIZE
    strict: bool = False
    client_local_users: bool = False
    no_identity: NoIdentityPolicy = "least_privilege"
    token_error_status: int = 503
    # Parsed (cookie, authorization) pairs -> Resolution, used only when the
    # identity depends on nothing else (no resolver, no roles/attributes
    # callables).  Repeat requests of one user then skip parsing and reuse one
    # EndUserContext object, which also lets the driver hook skip its token
    # lookup.  Bounded; malformed input is never cached (it must be logged).
    _resolved: dict[tuple[str | None, str | None], Resolution] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        problems = []
        if self.cookie_name is not None and (
            not isinstance(self.cookie_name, str) or not self.cookie_name
        ):
            problems.append("cookie_name must be a non-empty string or None")
        if not isinstance(self.bearer, bool):
            problems.append("bearer must be true or false")
        for name in ("resolver", "data_roles", "attributes"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                problems.append(f"{name} must be a callable taking the request, or None")
        if isinstance(self.max_size, bool) or not isinstance(self.max_size, int):
            problems.append("max_size must be an integer number of bytes")
        elif not 64 <= self.max_size <= 1024 * 1024:
            problems.append("max_size must be between 64 and 1048576 bytes")
        if not isinstance(self.strict, bool):
            problems.append("strict must be true or false")
        if not isinstance(self.client_local_users, bool):
            problems.append("client_local_users must be true or false")
        if self.no_identity not in ("least_privilege", "deny"):
            problems.append(
                f"no_identity must be 'least_privilege' or 'deny', got {self.no_identity!r}"
            )
        if (
            isinstance(self.token_error_status, bool)
            or not isinstance(self.token_error_status, int)
            or not 400 <= self.token_error_status <= 599
        ):
            problems.append("token_error_status must be an HTTP error status (400-599)")
        if problems:
            raise ConfigError(problems, where="deepsec adapter settings")

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The public setting names (what ``DEEPSEC`` / ``DEEPSEC_*`` may set)."""
        return frozenset(f for f in cls.__dataclass_fields__ if not f.startswith("_"))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, where: str) -> WebSettings:
        """Build settings from a dict (Django ``DEEPSEC``, Flask ``DEEPSEC_*``).

        Keys are the attribute names, case-insensitive; unknown keys are an
        error naming them.
        """
        known = cls.field_names()
        lowered = {str(k).lower(): v for k, v in values.items()}
        unknown = sorted(k for k in lowered if k not in known)
        if unknown:
            raise ConfigError(
                [f"unknown setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"],
                where=where,
            )
        try:
            return cls(**lowered)
        except ConfigError as exc:
            raise ConfigError(exc.problems, where=where) from None


def _size_ok(value: str, max_size: int) -> bool:
    return len(value) <= max_size and len(value.encode("utf-8", "surrogatepass")) <= max_size


_COOKIE_ESCAPE = re.compile(r"\\(?:([0-3][0-7][0-7])|(.))")


def _unquote_cookie(inner: str) -> str:
    return _COOKIE_ESCAPE.sub(
        lambda m: chr(int(m.group(1), 8)) if m.group(1) else m.group(2), inner
    )


def identity_from_cookie(value: str | None, *, max_size: int = DEFAULT_MAX_SIZE) -> Identity | None:
    """Parse the ``identity`` cookie value.

    A JSON string is a token, JSON ``[name, key|null]`` a local end user, a
    bare value a token.  Percent-encoded JSON (``%5B...``, ``%22...``) and
    the backslash-escaped quoted form that ``http.cookies`` and werkzeug write
    (``"[\\"bob\\"\\054 null]"``) are decoded first.

    Raises:
        MalformedIdentity: the value is oversized or not one of those forms.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if not _size_ok(value, max_size):
        raise MalformedIdentity(f"identity cookie is larger than {max_size} bytes")
    if value[:3].upper() in ("%5B", "%22"):
        value = unquote(value)
    elif len(value) >= 2 and value[0] == value[-1] == '"' and "\\" in value:
        # An RFC 2109 quoted-string, as http.cookies and werkzeug write a value
        # with commas or spaces: '"[\\"bob\\"\\054 null]"' is ["bob", null].
        value = _unquote_cookie(value[1:-1])
    if value[0] in '["{':
        try:
            decoded = json.loads(value)
        except ValueError:
            raise MalformedIdentity("identity cookie is not valid JSON") from None
        if isinstance(decoded, str) and not _B64TOKEN.fullmatch(decoded):
            raise MalformedIdentity("identity cookie holds a string that is not a token")
        if not isinstance(decoded, (str, list)):
            raise MalformedIdentity(
                "identity cookie must be a JSON string (token) or [name, key|null]"
            )
        try:
            return validate_identity(decoded)
        except (TypeError, IdentityError) as exc:
            raise MalformedIdentity(f"identity cookie: {exc}") from None
    if not _B64TOKEN.fullmatch(value):
        raise MalformedIdentity("identity cookie is neither JSON nor a token")
    return value


def identity_from_authorization(
    value: str | None, *, max_size: int = DEFAULT_MAX_SIZE
) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``.

    Other schemes (``Basic``...) are not ours and give ``None``.

    Raises:
        MalformedIdentity: (status 401) a Bearer header with a bad or oversized token.
    """
    if value is None:
        return None
    if not _size_ok(value, max_size + 7):
        raise MalformedIdentity(f"Authorization header is larger than {max_size} bytes", status=401)
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    if not token or not _B64TOKEN.fullmatch(token):
        raise MalformedIdentity("Authorization: Bearer token is malformed", status=401)
    return token


def parse_cookie_header(header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a raw ``Cookie`` header (first one wins).

    A small strict parser for adapters that see raw headers (ASGI).
    """
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip() == name:
            # A quoted RFC 6265 value stays quoted: it then parses as a JSON string.
            return value.strip()
    return None


def _warn_malformed(exc: MalformedIdentity) -> None:
    # The message describes the problem only; the value never reaches logs.
    log.warning("ignoring a malformed end-user identity: %s", exc)


def _deny(message: str, status: int, *, error: str | None = None) -> Rejection:
    if status == 401:
        challenge = 'Bearer error="invalid_token"' if error else "Bearer"
        headers: tuple[tuple[str, str], ...] = (("WWW-Authenticate", challenge),)
    else:
        headers = ()
    body = {"error": error or ("unauthorized" if status == 401 else "bad_request")}
    body["detail"] = message
    return Rejection(status, body, headers)


def resolve(
    settings: WebSettings,
    request: Any,
    *,
    cookie: str | None = None,
    authorization: str | None = None,
) -> Resolution:
    """Decide the end-user context for one request.

    ``cookie`` is the raw value of ``settings.cookie_name`` and
    ``authorization`` the raw ``Authorization`` header, as the adapter found
    them; ``request`` is passed to the app's callables.
    """
    cacheable = (
        settings.resolver is None and settings.data_roles is None and settings.attributes is None
    )
    if cacheable:
        key = (cookie, authorization)
        hit = settings._resolved.get(key)
        if hit is not None:
            return hit
        resolution, malformed = _resolve(settings, request, cookie, authorization)
        if not malformed:
            cache = settings._resolved
            if len(cache) >= _RESOLVED_CACHE_SIZE:
                with _resolved_lock:
                    for old in list(cache)[: _RESOLVED_CACHE_SIZE // 4]:
                        cache.pop(old, None)
            cache[key] = resolution
        return resolution
    return _resolve(settings, request, cookie, authorization)[0]


_RESOLVED_CACHE_SIZE = 512
_resolved_lock = threading.Lock()
_NONE = Resolution(context=None)


def _cookie_identity(settings: WebSettings, cookie: str | None) -> Identity | None:
    identity = identity_from_cookie(cookie, max_size=settings.max_size)
    if isinstance(identity, tuple) and not settings.client_local_users:
        # Nothing authenticates a keyless local end user: whoever sends the
        # cookie would be that user.  Local users come from a resolver that
        # derives them from the app's own authentication, unless opted in.
        raise MalformedIdentity(
            "a (name, key) end user in the identity cookie is not accepted "
            "(client_local_users is off)"
        )
    return identity


def _resolve(
    settings: WebSettings, request: Any, cookie: str | None, authorization: str | None
) -> tuple[Resolution, bool]:
    """The resolution, and whether the input was malformed (never cached)."""
    identity: Identity | EndUserContext | None
    malformed = False
    try:
        if settings.resolver is not None:
            resolved = settings.resolver(request)
            if isinstance(resolved, EndUserContext):
                identity = resolved
            else:
                identity = validate_identity(resolved)
        else:
            identity = None
            if settings.cookie_name is not None:
                try:
                    identity = _cookie_identity(settings, cookie)
                except MalformedIdentity as exc:
                    # A bad cookie is absent: a valid bearer header still counts.
                    if settings.strict:
                        return Resolution(rejection=_deny(str(exc), exc.status)), True
                    _warn_malformed(exc)
                    malformed = True
            if identity is None and settings.bearer:
                identity = identity_from_authorization(authorization, max_size=settings.max_size)
    except MalformedIdentity as exc:
        if settings.strict:
            error = "invalid_token" if exc.status == 401 else None
            return Resolution(rejection=_deny(str(exc), exc.status, error=error)), True
        _warn_malformed(exc)
        identity = None
        malformed = True

    if identity is None:
        if settings.no_identity == "deny":
            rejection = _deny("an end-user identity is required", 401)
            return Resolution(rejection=rejection), malformed
        return _NONE, malformed
    if isinstance(identity, EndUserContext):
        return Resolution(context=identity), False
    roles = settings.data_roles(request) if settings.data_roles is not None else None
    attrs = settings.attributes(request) if settings.attributes is not None else None
    return Resolution(context=EndUserContext(identity, roles, attrs)), False


# The database rejected the end user's token (ORA-52601: expired, revoked,
# wrong audience), or the identity provider rejected it as an on-behalf-of
# assertion: the user must sign in again, which is a 401, not an outage.
_END_USER_TOKEN_REJECTED = 52601


def _oracle_error_code(exc: BaseException) -> int | None:
    """The ORA number of a python-oracledb error, also when a framework wrapped it.

    Django re-raises driver errors as ``django.db.DatabaseError`` *from* the
    original; SQLAlchemy keeps it as ``.orig``.
    """
    current: object = exc
    for _ in range(4):
        if isinstance(current, oracledb.DatabaseError):
            code = getattr(current.args[0], "code", None) if current.args else None
            return code if isinstance(code, int) else None
        current = getattr(current, "orig", None) or getattr(current, "__cause__", None)
        if current is None:
            return None
    return None


def rejection_for_error(exc: BaseException, settings: WebSettings) -> Rejection | None:
    """The response for an end-user token failure raised while serving a request.

    * The identity does not fit the configuration (a ``(name, key)`` user
      where ``on_behalf_of`` needs a token): 401 ``invalid_token``.
    * The end user's own token was rejected — by the database (ORA-52601) or
      by the identity provider as an on-behalf-of assertion (``invalid_grant``,
      or already expired) — 401 with ``WWW-Authenticate: Bearer
      error="invalid_token"``: the user must sign in again.
    * Any other :class:`~deepsec.TokenAcquisitionError` fails closed with
      ``settings.token_error_status`` (503 by default, with ``Retry-After``).

    Bodies carry the provider's error code and correlation id, never a token
    or secret.  ``None`` for every other exception: not ours to answer.
    """
    if isinstance(exc, IdentityNotAccepted):
        return _deny("this service needs the end user's bearer token", 401, error="invalid_token")
    if isinstance(exc, TokenAcquisitionError):
        if exc.error in USER_TOKEN_REJECTED:
            return _deny(
                "the identity provider rejected the end user's token",
                401,
                error="invalid_token",
            )
        body = {"error": "token_unavailable", "detail": "the database-access token is unavailable"}
        if exc.error:
            body["provider_error"] = exc.error
        if exc.correlation_id:
            body["correlation_id"] = exc.correlation_id
        headers: tuple[tuple[str, str], ...] = ()
        if settings.token_error_status == 503:
            headers = (("Retry-After", "5"),)
        return Rejection(settings.token_error_status, body, headers)
    if isinstance(exc, TokenNotReadyError):
        # An asyncio statement found no token (dropped after ORA-52602, say):
        # nothing was sent; the client's retry fetches one before the app runs.
        body = {"error": "token_unavailable", "detail": "the database-access token is unavailable"}
        return Rejection(settings.token_error_status, body, (("Retry-After", "1"),))
    if _oracle_error_code(exc) == _END_USER_TOKEN_REJECTED:
        return _deny("the database rejected the end user's token", 401, error="invalid_token")
    return None
