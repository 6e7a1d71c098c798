"""Pure ASGI middleware: every HTTP request and WebSocket runs as its end user.

::

    from deepsec.asgi import EndUserSecMiddleware

    app = EndUserSecMiddleware(app, strict=True)
    # Starlette / FastAPI: app.add_middleware(EndUserSecMiddleware, strict=True)

For ``http`` and ``websocket`` scopes the middleware resolves the identity
(:func:`deepsec.web.resolve`: the ``identity`` cookie, else
``Authorization: Bearer``, or the app's ``resolver``), activates the
:class:`~deepsec.EndUserContext`, fetches the database-access tokens the
request will need off the event loop (:func:`deepsec.prepare`, so asyncio
connections find them cached), and runs the app.  The context stays active for
the whole app call -- the endpoint, a streaming body, background tasks, a
WebSocket session -- and is reset in ``finally``.  Sync endpoints that
Starlette runs in its thread pool see it too: anyio copies the context into
the worker thread.  ``lifespan`` and other scopes pass through untouched.

The ``resolver``, ``data_roles`` and ``attributes`` callables receive an
:class:`ASGIConnection` (``.scope``, ``.headers``, ``.cookies``...), not a
framework request, so the middleware works under any ASGI framework; build
one if you need it (``starlette.requests.HTTPConnection(conn.scope)``).

The resolved context (or ``None``) is stored in ``scope["deepsec.end_user"]``;
:mod:`deepsec.fastapi` reuses it (the request's activation knows the
settings it was resolved by).

Rejections (one mapping for every adapter, :mod:`deepsec.lifecycle`): HTTP
gets the JSON response (400/401 with ``WWW-Authenticate``; 401
``invalid_token`` also when the database or the identity provider rejects the
end user's token; 503 with ``Retry-After`` when a token cannot be obtained),
also for such an error raised by a statement inside the endpoint, as long as
the response has not started.  Wrapped around a whole framework app, whose
error middleware answers 500 and re-raises, the middleware holds that 500
back and answers in its place (a 500 whose body streams or passes 64 KB is
sent on unheld).  A WebSocket
handshake is denied with that HTTP response when the server supports the
``websocket.http.response`` extension, else closed with code 1008 (policy
violation; 1013 "try again later" for a provider failure), which servers turn
into HTTP 403.

Settings: the one table in ``docs/settings.md``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from typing import Any, TypeVar

from ._identity_parse import COOKIE_JOIN, cookie_pairs
from .context import EndUserContext, _current
from .lifecycle import TOKEN_CONFIGS, RequestLease, _start, answer, fetch_tokens
from .web import Rejection, WebSettings, remember_alias

__all__ = ["SCOPE_KEY", "ASGIConnection", "EndUserSecMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Scope key holding the request's resolved context (``None``: no end user).
#: (The one key the middleware adds: frameworks fill the scope up to where
#: one more key costs a resize of the dict; the settings are on the lease.)
SCOPE_KEY = "deepsec.end_user"


#: Header values read as bytes.  The ASGI spec says bytes; a memoryview is
#: read too, because the lookup by raw bytes (_lease_by_bytes) finds one
#: equal to remembered bytes: read in both paths, a value names one user.
_BYTES_LIKE = (bytes, bytearray, memoryview)


def _latin1(value: bytes | bytearray | memoryview) -> str:
    """A header value as text (one char per byte); a memoryview in its logical order."""
    return (value.tobytes() if isinstance(value, memoryview) else value).decode("latin-1")


class _Headers(Mapping[str, str]):
    """Read-only, case-insensitive view of ASGI headers (repeated ones joined)."""

    __slots__ = ("_values",)

    def __init__(self, raw: Any) -> None:
        values: dict[str, str] = {}
        for name, value in raw or ():
            if not isinstance(name, _BYTES_LIKE) or not isinstance(value, _BYTES_LIKE):
                continue  # not bytes-like, against the ASGI spec: absent (never a 500)
            key = _latin1(name).lower()
            text = _latin1(value)
            if key in values:
                # RFC 9110 list syntax; HTTP/2 splits cookies into several fields.
                # Cookie fields are joined as WSGI servers and Django join them,
                # so the same bytes give the same cookies (deepsec.web.resolve).
                values[key] += (COOKIE_JOIN if key == "cookie" else ", ") + text
            else:
                values[key] = text
        self._values = values

    def __getitem__(self, key: str) -> str:
        return self._values[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        # Authorization and cookies are secrets: names only.
        return f"<headers {sorted(self._values)!r}>"


class ASGIConnection:
    """The lightweight request handed to the app's ``resolver`` and callables."""

    __slots__ = ("_cookies", "_headers", "scope")

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self._headers: Mapping[str, str] | None = None
        self._cookies: dict[str, str] | None = None

    @property
    def headers(self) -> Mapping[str, str]:
        """Case-insensitive header mapping (latin-1 decoded; repeats joined)."""
        if self._headers is None:
            self._headers = _Headers(self.scope.get("headers"))
        return self._headers

    @property
    def cookies(self) -> Mapping[str, str]:
        """Cookie values by name (first one wins; quotes kept as sent)."""
        if self._cookies is None:
            cookies: dict[str, str] = {}
            for name, value in cookie_pairs(self.headers.get("cookie", "")):
                if name and name not in cookies:
                    cookies[name] = value
            self._cookies = cookies
        return self._cookies

    @property
    def type(self) -> str:
        """``"http"`` or ``"websocket"``."""
        return str(self.scope["type"])

    @property
    def method(self) -> str | None:
        """The HTTP method (``None`` for a WebSocket)."""
        method = self.scope.get("method")
        return str(method) if method is not None else None

    @property
    def path(self) -> str:
        """The request path."""
        return str(self.scope.get("path", ""))

    @property
    def client(self) -> tuple[str, int] | None:
        """``(host, port)`` of the client, when the server knows it."""
        client = self.scope.get("client")
        return (str(client[0]), int(client[1])) if client else None

    def __repr__(self) -> str:
        return f"ASGIConnection(type={self.type!r}, path={self.path!r})"


class EndUserSecMiddleware:
    """Run each HTTP request and WebSocket session as its end user.

    Args:
        app: the ASGI application to wrap.
        settings: a complete :class:`~deepsec.web.WebSettings`; or give its
            fields as keyword arguments, not both (the names are in
            ``docs/settings.md``).

    Raises:
        ConfigError: an unknown setting or a bad value (all of them listed).
    """

    def __init__(self, app: ASGIApp, *, settings: WebSettings | None = None, **kwargs: Any) -> None:
        if settings is not None and kwargs:
            raise TypeError("give either settings= or individual settings, not both")
        self.app = app
        self.settings = (
            settings
            if settings is not None
            else WebSettings.from_mapping(kwargs, where="EndUserSecMiddleware settings")
        )
        s = self.settings
        self._reads_request = not (
            s.resolver is None and s.data_roles is None and s.attributes is None
        )
        self._remembered = _remembered_by_bytes(s)

    def __repr__(self) -> str:
        return f"EndUserSecMiddleware({self.app!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # (self.app read into a local: CPython 3.11 does not specialize
        # calling an instance attribute as a method, self.app(...).)
        app = self.app
        kind = scope["type"]
        lease: Any = None
        key = None
        if kind == "http":
            try:
                raw = scope["headers"]
            except KeyError:  # a hand-built or minimal server's scope
                raw = ()
            lease, user, key = _lease_by_bytes(self._remembered, raw, _Exchange)
        elif kind != "websocket":
            await app(scope, receive, send)
            return
        if lease is None:
            outcome, user = self._start(scope, key)
            if type(outcome) is Rejection:
                await _reject(scope, receive, send, outcome)
                return
            lease = outcome
        settings = self.settings
        if user is not None and TOKEN_CONFIGS:  # needs_tokens(), inlined
            # Only a request that may need tokens pays for a coroutine.
            fetched = await fetch_tokens(lease, settings)
            if type(fetched) is Rejection:
                await _reject(scope, receive, send, fetched)
                return
        scope[SCOPE_KEY] = user
        lease.scope = scope
        lease.settings = settings
        lease._send = send
        lease._state = None
        try:
            await app(scope, receive, lease.send)
        except Exception as exc:
            # A statement in the endpoint failed for the end user's token
            # (ORA-52601, a provider failure, a token dropped after ORA-52602):
            # answer 401/503 if the response has not started -- also when a
            # framework inside already answered 500 (held back by send()).
            held = lease._state
            lease._state = True  # tasks that outlive the request keep no message
            rejection = None if held is True else answer(exc, settings)
            if rejection is None:
                if held is not None and held is not True:
                    await _flush(send, held)
                raise
            await _reject(scope, receive, send, rejection)
        else:
            held = lease._state
            if held is not None and held is not True:
                # A 500 without an exception reaching us: send it after all.
                lease._state = True
                await _flush(send, held)
        finally:
            lease.scope = None  # tasks that outlive the request keep no scope
            lease.end()

    def _start(
        self, scope: Scope, raw: tuple[Any, ...] | None
    ) -> tuple[_Exchange | Rejection, EndUserContext | None]:
        """Resolve and activate in full; and the end user (see :func:`_start_in_full`)."""
        return _start_in_full(
            self.settings,
            # Only the app's callables read the request: build it only for them.
            ASGIConnection(scope) if self._reads_request else None,
            scope.get("headers"),
            raw,
            self._remembered,
            _Exchange,
        )


#: First item of the keys under which the middleware remembers a resolution by
#: the raw header bytes (other keys start with text or None: never equal).
_BYTES = object()
#: Stands for a repeated header field in such a key: never remembered.
_REPEATED = object()


LeaseT = TypeVar("LeaseT", bound=RequestLease)

#: A held-back 500 is sent as soon as its body streams (``more_body``) or
#: passes this many bytes: only a framework's short error page is held.
HELD_500_LIMIT = 64 * 1024


class _Exchange(RequestLease):
    """One request's identity lease, and the guard on the app's ``send``.

    One object per request (the activation of its end user): ``send`` notes
    when the response started (after that an error can no longer be
    answered) and holds back a 500, which a framework's error middleware
    sends before re-raising, so that we can answer in its place.  Only a
    complete, small 500 is held (an error page); a streaming (``more_body``)
    or large (over :data:`HELD_500_LIMIT`) 500 body flushes what is held and
    goes on unbuffered, so memory and latency stay bounded.  A plain method
    returning the server's awaitable: no coroutine of its own per message.
    """

    __slots__ = ("_held_size", "_send", "_state")

    _send: Send
    #: ``None``: nothing sent yet; ``True``: the response started; a
    #: list: the messages of a 500 held back (``_held_size`` body bytes).
    _state: Any
    _held_size: int

    def send(self, message: Message) -> Awaitable[None]:
        # (The server's send read into a local: CPython 3.11 does not
        # specialize calling a slot's value as a method, self._send(...).)
        send, state = self._send, self._state
        if state is True:  # the common path once the status line is out
            return send(message)
        # ("status" is required in a response start: the server rejects one
        # without it anyway.)
        if state is None and message["type"] == "http.response.start" and message["status"] != 500:
            self._state = True
            return send(message)
        return self._rare(message)

    def _rare(self, message: Message) -> Awaitable[None]:
        """``send`` for a 500, a WebSocket, other messages before the start, a held 500."""
        state = self._state
        if state is None:
            kind = message["type"]
            if kind == "http.response.start":  # a 500: held back
                self._state = [message]
                self._held_size = 0
                return _nothing()
            if kind in _WS_STARTS:
                self._state = True
            return self._send(message)
        state.append(message)
        self._held_size += len(message.get("body", b""))
        if message.get("more_body", False) or self._held_size > HELD_500_LIMIT:
            self._state = True
            return _flush(self._send, state)
        return _nothing()


_WS_STARTS = frozenset({"websocket.accept", "websocket.close", "websocket.http.response.start"})


async def _nothing() -> None:
    """What a held-back message's ``send`` awaits."""


async def _flush(send: Send, held: list[Message]) -> None:
    """Send a held-back 500 after all (the error was not ours, or none came)."""
    for message in held:
        await send(message)


def _remembered_by_bytes(settings: WebSettings) -> dict[tuple[Any, ...], Any]:
    """Where an adapter looks a resolution up by the raw header bytes.

    The resolutions ``settings`` remember, when the identity depends on the
    header values alone and nothing is recorded per request; else an empty
    dict that is never filled (every request is resolved in full).
    """
    return settings._by_raw if settings._cacheable and not settings.record_end_user else {}


def _start_in_full(
    settings: WebSettings,
    request: Any,
    raw_headers: Any,
    raw: tuple[Any, ...] | None,
    remembered: dict[tuple[Any, ...], Any],
    lease_class: type[LeaseT],
) -> tuple[LeaseT | Rejection, EndUserContext | None]:
    """Resolve and activate a request that :func:`_lease_by_bytes` missed.

    :func:`deepsec.lifecycle.start` on the decoded ``Cookie`` and
    ``Authorization`` values; returns the lease (or the rejection) and the
    end user (``None``: none).
    A resolution remembered under the decoded header values is remembered
    under ``raw`` (their bytes, the hot path's key) as well, when
    ``remembered`` is where the adapter looks (:func:`_remembered_by_bytes`).
    """
    cookie_header, authorization = _identity_headers(raw_headers)
    outcome = _start(settings, request, cookie_header, authorization, lease_class)
    if type(outcome) is Rejection:
        return outcome, None
    # (Only a key of bytes: a value of another type was read as absent.)
    if (
        raw is not None
        and remembered is settings._by_raw
        and all(part is None or type(part) is bytes for part in raw[1:])
    ):
        remember_alias(settings, (cookie_header, authorization), raw)
    ctx = outcome.context
    return outcome, (ctx if ctx.identity is not None else None)


def _lease_by_bytes(
    remembered: dict[tuple[Any, ...], Any], raw: Any, lease_class: type[LeaseT]
) -> tuple[LeaseT | None, EndUserContext | None, tuple[Any, ...] | None]:
    """The hot path of the middleware and the FastAPI dependency: one dict lookup.

    The raw header bytes, not decoded, are the key of the resolution an
    earlier request with the same bytes got: ``(_BYTES, cookie,
    authorization)``, each field's bytes or ``None``; a repeated field is
    :data:`_REPEATED`, which nothing is remembered under.  Only valid
    resolutions without a warning are remembered under such keys: nothing to
    log, reject or record.  On a hit, returns the activated lease (of
    ``lease_class``) and the end user (``None``: none); on a miss, no lease
    and the key to remember the full resolution under (``None`` when the
    server gave headers that are not bytes).
    """
    cookie: Any = None
    authorization: Any = None
    for name, value in raw:
        if name == b"cookie":
            cookie = value if cookie is None else _REPEATED
        elif name == b"authorization":
            authorization = value if authorization is None else _REPEATED
    key = (_BYTES, cookie, authorization)
    try:
        hit = remembered.get(key)
    except (TypeError, ValueError):
        # A server gave header values that are not bytes and cannot be hashed
        # (a list; a writable memoryview raises ValueError): resolved in full.
        return None, None, None
    if hit is None:
        return None, None, key
    # Only contexts are remembered under these keys (remember_alias).
    user = hit if hit._identity is not None else None
    # new_activation(hit, lease_class), written out as in lifecycle._start
    # (the hot path; lease_class is one of deepsec's own).
    lease = lease_class()
    lease.context = hit
    lease.active = True
    lease._children = None
    lease._token = _current.set(lease)
    return lease, user, key


def _identity_headers(raw: Any) -> tuple[str | list[str] | None, str | list[str] | None]:
    """The raw ``Cookie`` and ``Authorization`` values, without decoding other headers.

    A repeated field gives a list of its values: :func:`deepsec.web.resolve`
    applies the one rule for repeats.
    """
    cookie: str | list[str] | None = None
    authorization: str | list[str] | None = None
    # ASGI servers give header names lowercased (the spec requires it).
    for name, value in raw or ():
        # (_one_more only for a repeated field: a call per header costs.)
        if name == b"cookie" and isinstance(value, _BYTES_LIKE):
            text = _latin1(value)
            cookie = text if cookie is None else _one_more(cookie, text)
        elif name == b"authorization" and isinstance(value, _BYTES_LIKE):
            text = _latin1(value)
            authorization = text if authorization is None else _one_more(authorization, text)
        # (A value that is not bytes-like breaks the ASGI spec: the field
        # counts as absent -- least privilege, never a 500.)
    return cookie, authorization


def _one_more(seen: str | list[str] | None, text: str) -> str | list[str]:
    if seen is None:
        return text
    if isinstance(seen, str):
        return [seen, text]
    seen.append(text)
    return seen


async def _reject(scope: Scope, receive: Receive, send: Send, rejection: Rejection) -> None:
    body = rejection.json_body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in rejection.headers),
    ]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": rejection.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    # WebSocket: take the handshake request first, then deny it.
    message = await receive()
    if message["type"] != "websocket.connect":
        return  # the client went away
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": rejection.status,
                "headers": headers,
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": rejection.close_code, "reason": ""})
