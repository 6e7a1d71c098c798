"""What every web adapter shares: identity from a request, policies, rejections.

Adapters (``deepsec.django``, ``deepsec.flask``, ``deepsec.asgi``,
``deepsec.fastapi``) only pull the *raw* ``Cookie`` and ``Authorization``
header values out of their framework's request and hand them, with the
request object, to :func:`resolve` (through :mod:`deepsec.lifecycle`).
Everything else lives here once, so the same bytes give the same end user in
every adapter:

* order: the app's ``resolver(request)``; else the cookie; else
  ``Authorization: Bearer <token>`` (scheme case-insensitive);
* raw values: several ``Cookie`` fields are one list (``;``, or ``,`` before
  the next ``name=``, as servers join them); several ``Authorization`` fields
  are one list (``,``); header bytes are UTF-8 (invalid UTF-8 is malformed);
* ambiguity is malformed: two different ``identity`` cookies, or a Bearer
  credential next to another credential;
* cookie values: a JSON string is a token, JSON ``[name, key|null]`` a local
  end user, a bare (non-JSON) value a token; size- and depth-bounded parsing;
* malformed input is *no identity* (one WARNING per request, never the value)
  or, with ``strict=True``, HTTP 400/401; no input reaches a 500;
* the ``no_identity`` policy: ``least_privilege`` (default) or ``deny`` (401);
* the answer to each error (:func:`rejection_for_error`, one mapping).

The settings are documented once, in ``docs/settings.md``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ._identity_parse import (
    DEFAULT_MAX_SIZE,
    MalformedIdentity,
    from_wire,
    identity_from_authorization,
    identity_from_cookie,
    parse_cookie_header,
)
from ._rejections import Reason, Rejection, deny
from ._rejections import rejection_for_error as _rejection_for_error
from ._validation import validate_identity
from .context import _EMPTY, EndUserContext, Identity
from .errors import ConfigError, IdentityError

__all__ = [
    "DEFAULT_MAX_SIZE",
    "MalformedIdentity",
    "Reason",
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

NoIdentityPolicy = Literal["least_privilege", "deny"]
#: ``resolver(request)`` returns an identity, a full context, or ``None``.
Resolver = Callable[[Any], "Identity | EndUserContext | list[Any] | None"]


@dataclass(frozen=True)
class Resolution:
    """The outcome of :func:`resolve`: a context to activate, or a rejection."""

    context: EndUserContext | None = None
    rejection: Rejection | None = None


@dataclass(frozen=True)
class WebSettings:
    """Adapter settings, shared by all frameworks.

    Every field, its type, default and meaning is in the one settings table,
    ``docs/settings.md``; the adapters take the same names (Django
    ``DEEPSEC``, Flask ``DEEPSEC_*``, keyword arguments of the ASGI
    middleware and the FastAPI dependency).
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
    record_end_user: bool | str = field(default=False, repr=False)
    # (identity cookie, Authorization) -> resolution and its warnings, used
    # only when the identity depends on nothing else (no resolver, no
    # roles/attributes callables).  Repeat requests of one user then skip
    # parsing and reuse one EndUserContext object, which also lets the driver
    # hook skip its token lookup.  Bounded in entries and, since only inputs
    # within max_size are kept, in bytes; malformed inputs are never kept, so
    # their warning is logged on every request.
    _resolved: dict[tuple[Any, ...], tuple[Resolution, tuple[str, ...]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # The same resolutions by the raw header values an adapter hands over --
    # (Cookie header, Authorization), or an adapter's own form of them, see
    # remember_alias -- kept as what a request activates: the context
    # (_EMPTY: no end user) or the rejection.  The adapters' hot path: one
    # lookup, nothing to unpack.  Only resolutions without a warning.
    _by_raw: dict[tuple[Any, ...], EndUserContext | Rejection] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _cacheable: bool = field(default=True, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Whether the identity depends on the header values alone (see _resolved).
        object.__setattr__(
            self,
            "_cacheable",
            self.resolver is None and self.data_roles is None and self.attributes is None,
        )
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
        if not isinstance(self.record_end_user, bool) and not (
            isinstance(self.record_end_user, str) and len(self.record_end_user) >= 16
        ):  # the value may be a key: never echoed
            problems.append("record_end_user must be true, false or a key of 16+ characters")
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


def _warn_malformed(*messages: str) -> None:
    # The messages describe the problem only; the value never reaches logs.
    for message in messages:
        log.warning("ignoring a malformed end-user identity: %s", message)


def resolve(
    settings: WebSettings,
    request: Any,
    *,
    cookie: str | None = None,
    cookie_header: str | Sequence[str] | None = None,
    authorization: str | Sequence[str] | None = None,
) -> Resolution:
    """Decide the end-user context for one request.  Never raises for any input.

    Adapters give ``cookie_header``, the raw ``Cookie`` field(s), and
    ``authorization``, the raw ``Authorization`` field(s), as text holding the
    header bytes (latin-1, what WSGI and ASGI servers hand over); ``cookie``
    is an already-extracted value of ``settings.cookie_name`` (for callers
    that have one).  ``request`` is passed to the app's callables.
    """
    cache = settings._resolved if settings._cacheable else None
    # Remembered under the raw header values too (settings._by_raw):
    # deepsec.lifecycle.start() looks a repeat request up there before
    # calling us (one dict lookup, no cookie scanning).  Repeated fields
    # (lists) are not remembered raw, nor raw values beyond the cap parsed
    # ones have: a huge Cookie header (other cookies, padding) never becomes
    # a key.  Malformed ones: see below.
    raw_key: tuple[Any, ...] | None = None
    if (
        cache is not None
        and cookie is None
        and (cookie_header is None or type(cookie_header) is str)
        and (authorization is None or type(authorization) is str)
        and (len(cookie_header) if cookie_header else 0)
        + (len(authorization) if authorization else 0)
        <= settings.max_size
    ):
        raw_key = (cookie_header, authorization)
    warnings: tuple[str, ...] = ()
    name = settings.cookie_name
    if (
        cookie_header is not None
        and name is not None
        and settings.resolver is None
        # Most requests without our cookie: skip the parser.
        and (name in cookie_header if isinstance(cookie_header, str) else True)
    ):
        try:
            cookie = parse_cookie_header(cookie_header, name, max_size=settings.max_size)
            if cookie is not None:
                cookie = from_wire(cookie)
        except MalformedIdentity as exc:
            if settings.strict:
                return _malformed(settings, exc)
            warnings, cookie = (str(exc),), None
    if authorization is not None and not isinstance(authorization, str):
        authorization = ", ".join(authorization) if authorization else None
    if cache is None:
        resolution, message = _resolve(settings, request, cookie, authorization)
        if message is not None:
            warnings += (message,)
        if warnings:
            _warn_malformed(*warnings)
        return resolution
    # Only values that can be valid are cached: oversized ones (rejected
    # anyway) would let a client fill the cache with megabytes, and a
    # malformed result is not kept either (it is logged per request below).
    size = (len(cookie) if cookie else 0) + (len(authorization) if authorization else 0)
    key = (cookie, authorization)
    small = size <= settings.max_size
    hit = cache.get(key) if small else None
    if hit is None:
        resolution, message = _resolve(settings, request, cookie, authorization)
        hit = (resolution, () if message is None else (message,))
        if small and message is None:
            _remember(cache, key, hit)
    if hit[1]:
        warnings += hit[1]
    if raw_key is not None and not warnings:  # malformed: resolved (and warned) each time
        _remember(settings._by_raw, raw_key, _activated(hit[0]))
    if warnings:
        _warn_malformed(*warnings)
    return hit[0]


def _activated(resolution: Resolution) -> EndUserContext | Rejection:
    """What a request resolved so activates (``_EMPTY``: no end user), or its rejection."""
    if resolution.rejection is not None:
        return resolution.rejection
    return resolution.context if resolution.context is not None else _EMPTY


def _remember(cache: dict[tuple[Any, ...], Any], key: tuple[Any, ...], value: Any) -> None:
    if len(cache) >= _RESOLVED_CACHE_SIZE:
        with _resolved_lock:
            for old in list(cache)[: _RESOLVED_CACHE_SIZE // 4]:
                cache.pop(old, None)
    cache[key] = value


def remember_alias(settings: WebSettings, key: tuple[Any, ...], alias: tuple[Any, ...]) -> None:
    """Remember the context kept under the raw ``key`` also under ``alias``.

    For an adapter's own form of the same raw header values (the ASGI
    middleware's header bytes), so that a repeat request skips decoding them.
    Only what :func:`resolve` remembered (valid, without a warning, within
    ``max_size``) is there to copy: malformed input stays uncached.  Only a
    context, never a rejection: such an alias is looked up by code that
    activates what it finds.
    """
    if not settings._cacheable:
        return
    try:
        hit = settings._by_raw.get(key)
    except TypeError:  # a repeated field is a list: never remembered
        return
    if isinstance(hit, EndUserContext):
        _remember(settings._by_raw, alias, hit)


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


def _parse_failure(exc: Exception) -> MalformedIdentity:
    # Anything a parser raises is bad input, never a 500; its text is ours
    # only for MalformedIdentity (other messages might quote the value).
    if isinstance(exc, MalformedIdentity):
        return exc
    return MalformedIdentity(f"identity could not be parsed ({type(exc).__name__})")


def _malformed(settings: WebSettings, exc: MalformedIdentity) -> Resolution:
    error = "invalid_token" if exc.status == 401 else None
    return Resolution(
        rejection=deny(str(exc), exc.status, reason="malformed_identity", error=error)
    )


def _resolve(
    settings: WebSettings, request: Any, cookie: str | None, authorization: str | None
) -> tuple[Resolution, str | None]:
    """The resolution, and the warning to log for malformed input (or ``None``)."""
    identity: Identity | EndUserContext | None = None
    warning: str | None = None
    if settings.resolver is not None:
        resolved = settings.resolver(request)
        if isinstance(resolved, EndUserContext):
            identity = resolved
        else:
            try:
                identity = validate_identity(resolved)
            except (TypeError, IdentityError) as exc:
                # The app's resolver returned a bad value: its bug, reported as such.
                raise IdentityError(f"the resolver returned a bad identity: {exc}") from None
    else:
        if settings.cookie_name is not None and cookie is not None:
            try:
                identity = _cookie_identity(settings, cookie)
            except Exception as exc:
                # A bad cookie is absent: a valid bearer header still counts.
                bad = _parse_failure(exc)
                if settings.strict:
                    return _malformed(settings, bad), None
                warning = str(bad)
        if identity is None and settings.bearer and authorization is not None:
            try:
                identity = identity_from_authorization(authorization, max_size=settings.max_size)
            except Exception as exc:
                bad = _parse_failure(exc)
                if bad.status != 401:
                    bad = MalformedIdentity(str(bad), status=401)
                if settings.strict:
                    return _malformed(settings, bad), None
                warning = str(bad) if warning is None else f"{warning}; {bad}"

    if identity is None:
        if settings.no_identity == "deny":
            rejection = deny("an end-user identity is required", 401, reason="no_identity")
            return Resolution(rejection=rejection), warning
        return _NONE, warning
    if isinstance(identity, EndUserContext):
        return Resolution(context=identity), warning
    roles = settings.data_roles(request) if settings.data_roles is not None else None
    attrs = settings.attributes(request) if settings.attributes is not None else None
    return Resolution(context=EndUserContext(identity, roles, attrs)), warning


def rejection_for_error(exc: BaseException, settings: WebSettings) -> Rejection | None:
    """The response for an end-user failure raised while serving a request.

    ORA-52601 and rejected user tokens: 401 with ``WWW-Authenticate``;
    provider failures and :class:`~deepsec.TokenNotReadyError`:
    ``settings.token_error_status`` (503 with ``Retry-After``); ``None`` for
    every other exception.  The one mapping every adapter uses (details in
    :mod:`deepsec._rejections`).
    """
    return _rejection_for_error(exc, settings.token_error_status)
