"""Flask extension: every request runs as the end user it carries.

::

    from flask import Flask
    from deepsec.flask import DeepSec, current_end_user

    app = Flask(__name__)
    app.config["DEEPSEC_STRICT"] = True
    DeepSec(app)                # or: deepsec = DeepSec(); deepsec.init_app(app)

Settings (the one table: ``docs/settings.md``) are given as keyword arguments
to :class:`DeepSec` (defaults for every app) and overridden per app by
``DEEPSEC_<NAME>`` config keys (``DEEPSEC_STRICT``, ``DEEPSEC_NO_IDENTITY``...).
An unknown ``DEEPSEC_`` key is a :class:`~deepsec.ConfigError` naming it.

What the extension does, and nothing more (the logic is in :mod:`deepsec.web`):

* a ``before_request`` function, run before any other one, resolves the
  request's identity and activates its :class:`~deepsec.EndUserContext` (or
  answers the request's rejection: 400/401 in strict mode, 401 with
  ``no_identity="deny"``);
* a ``teardown_request`` function restores the previous context, also when the
  view raised;
* a streamed response body (a generator, with or without
  :func:`flask.stream_with_context`) is iterated under the same end user and
  the context is reset when the server closes it;
* errors get the answer every adapter gives (:mod:`deepsec.lifecycle`):
  :class:`~deepsec.TokenAcquisitionError` and
  :class:`~deepsec.TokenNotReadyError` a 503 JSON response with
  ``Retry-After`` (no token or secret in it), a rejected end-user token a 401;
  ORA-52601 (the database rejected it) a 401 too, unless the app registered
  its own ``oracledb.DatabaseError`` handler.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import oracledb
from flask import Flask, Response, current_app, request
from werkzeug.local import LocalProxy

from . import context as _context
from .context import EndUserContext, activate, current_context
from .errors import ConfigError, DeepSecError
from .lifecycle import _start, answer
from .web import Rejection, WebSettings

__all__ = ["CONFIG_PREFIX", "DeepSec", "DeepSecState", "current_end_user"]

#: Prefix of the Flask config keys this extension reads.
CONFIG_PREFIX = "DEEPSEC_"
_EXTENSION_KEY = "deepsec"
_ENVIRON_KEY = "deepsec.token"

#: The current request's :class:`~deepsec.EndUserContext`, or ``None`` when it
#: has no end user.  A proxy: test it with ``if current_end_user:``.
current_end_user: EndUserContext | None = LocalProxy(_context.current_end_user)  # type: ignore[assignment]


@dataclass(frozen=True)
class DeepSecState:
    """What :meth:`DeepSec.init_app` stores in ``app.extensions["deepsec"]``."""

    extension: DeepSec
    settings: WebSettings


class DeepSec:
    """The Flask extension (application-factory friendly).

    Args:
        app: the application to set up now; or call :meth:`init_app` later.
        **settings: default settings (names in ``docs/settings.md``);
            ``DEEPSEC_*`` config keys override them.

    Raises:
        ConfigError: an unknown setting or a bad value (all of them listed).
    """

    def __init__(self, app: Flask | None = None, **settings: Any) -> None:
        known = _known_settings()
        unknown = sorted(k for k in settings if k not in known)
        if unknown:
            raise ConfigError(
                [f"unknown setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"],
                where="DeepSec() arguments",
            )
        # Validate the defaults now, so a typo fails at import time.
        WebSettings.from_mapping(settings, where="DeepSec() arguments")
        self._defaults: dict[str, Any] = dict(settings)
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return f"DeepSec(settings={sorted(self._defaults)!r})"

    def init_app(self, app: Flask) -> None:
        """Read ``DEEPSEC_*`` config and register the request hooks on ``app``.

        Raises:
            ConfigError: an unknown ``DEEPSEC_`` key or a bad value.
        """
        settings = self.settings_from_config(app.config, where=f"Flask app {app.name!r} config")
        app.extensions[_EXTENSION_KEY] = DeepSecState(self, settings)
        # First, so other before_request functions already run as the end user.
        app.before_request_funcs.setdefault(None, []).insert(0, _before_request)
        app.after_request(_after_request)
        app.teardown_request(_teardown_request)
        app.register_error_handler(DeepSecError, _deepsec_error)
        if oracledb.DatabaseError not in app.error_handler_spec[None][None]:
            # ORA-52601 (the database rejected the end user's token) is a 401;
            # every other database error is re-raised, exactly as unhandled.
            app.register_error_handler(oracledb.DatabaseError, _deepsec_error)

    def settings_from_config(self, config: Mapping[str, Any], *, where: str) -> WebSettings:
        """Merge this extension's defaults with the ``DEEPSEC_*`` keys of ``config``."""
        known = _known_settings()
        values = dict(self._defaults)
        unknown = []
        for key, value in config.items():
            if not isinstance(key, str) or not key.startswith(CONFIG_PREFIX):
                continue
            name = key[len(CONFIG_PREFIX) :].lower()
            if name not in known:
                unknown.append(key)
            values[name] = value
        if unknown:
            names = ", ".join(CONFIG_PREFIX + k.upper() for k in sorted(known))
            raise ConfigError(
                [f"unknown config key(s): {', '.join(sorted(unknown))} (known: {names})"],
                where=where,
            )
        return WebSettings.from_mapping(values, where=where)

    @staticmethod
    def settings(app: Flask | None = None) -> WebSettings:
        """The settings in force for ``app`` (default: the current app)."""
        target = app if app is not None else current_app
        state: DeepSecState = target.extensions[_EXTENSION_KEY]
        return state.settings


def _known_settings() -> frozenset[str]:
    return WebSettings.field_names()


def _state() -> DeepSecState:
    state: DeepSecState = current_app.extensions[_EXTENSION_KEY]
    return state


def _response(rejection: Rejection) -> Response:
    return Response(
        rejection.json_body(),
        status=rejection.status,
        headers=list(rejection.headers),
        mimetype="application/json",
    )


def _before_request() -> Response | None:
    environ = request.environ
    # The raw header values: web.resolve applies the one rule for repeats,
    # encodings and quoting (werkzeug's cookie parser would drop ["bob", null]).
    outcome = _start(
        _state().settings,
        request._get_current_object(),  # type: ignore[attr-defined]
        environ.get("HTTP_COOKIE"),  # (cookie, then authorization)
        environ.get("HTTP_AUTHORIZATION"),
    )
    if type(outcome) is Rejection:
        # Still activate "no end user": the request must not inherit whatever
        # the worker thread's context holds (after_request functions run).
        environ[_ENVIRON_KEY] = activate(None)
        return _response(outcome)
    environ[_ENVIRON_KEY] = outcome
    return None


def _after_request(response: Response) -> Response:
    # A streamed body is iterated by the server after the request context is
    # gone (and after teardown has reset the context): run it as the same end
    # user, and reset when the server closes it.  File responses
    # (direct_passthrough) are left alone so servers can still sendfile them.
    if response.is_streamed and not response.direct_passthrough:
        response.response = _ScopedBody(response.response, current_context())
    return response


class _ScopedBody:
    """A streamed body whose every chunk (and its close) runs as one end user.

    The context is current only while a chunk is produced: between chunks,
    and after the server drops the body, the server's thread has none.
    """

    __slots__ = ("_body", "_context", "_iterator")

    def __init__(self, body: Iterable[Any], context: EndUserContext) -> None:
        self._body = body
        self._context = context
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> _ScopedBody:
        return self

    def __next__(self) -> Any:
        with activate(self._context):
            if self._iterator is None:
                self._iterator = iter(self._body)
            return next(self._iterator)

    def close(self) -> None:
        """Close the body (a generator's ``finally`` runs as the end user too)."""
        close = getattr(self._body, "close", None)
        if close is None:
            return
        with activate(self._context):
            close()


def _teardown_request(exc: BaseException | None) -> None:
    activation = request.environ.pop(_ENVIRON_KEY, None)
    if activation is not None:
        activation.end()


def _deepsec_error(exc: Exception) -> Response:
    """deepsec's own errors and ORA-52601 as responses; anything else re-raised."""
    rejection = answer(exc, _state().settings)
    if rejection is None:
        raise exc
    return _response(rejection)
