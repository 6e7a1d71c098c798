"""``python -m deepsec doctor``: system checks, parameters and a token, without a database.

Give it a Django settings module (``--settings mysite.settings``) or a JSON
file (``--config file.json`` holding ``end_user_sec_params``,
``extra_auth_params``, or the parameters themselves, and optionally ``dsn``
and ``DEEPSEC``).

With ``--settings`` it first runs deepsec's Django system checks on the
module (``INSTALLED_APPS``, ``MIDDLEWARE`` order, ``DEEPSEC``, each
database's ENGINE, TCPS connect string and ``end_user_sec_params``: see
:mod:`deepsec.django.checks`), every problem listed with what to change; a
module that fails to import is reported with its cause (the missing
environment variable).  Then, for each configuration it:

1. validates ``end_user_sec_params`` (every problem listed);
2. acquires the database-access token from the identity provider, exactly as
   a connection would (``--identity`` supplies the end user: a token, or JSON
   ``["name", null]``; required for ``on_behalf_of``);
3. decodes the token's claims (without verifying them, and without ever
   printing the token) and builds the end-user security context offline;
4. reports what each connection would carry: spi_type, auth_flow, identity
   kind, the user name claim, data roles, attributes and the token's expiry.

No database is contacted.

Exit codes: ``0`` all good; ``1`` invalid configuration (a failing system
check, invalid parameters or identity); ``2`` token acquisition failed;
``3`` usage error (bad arguments, unreadable file, settings module that
cannot be imported).

Tokens, client secrets, database passwords and keys are never printed:
values are described by kind, and any error text is scrubbed of the secrets
the command knows.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from . import _jwt
from .config import EndUserSecConfig, parse_end_user_sec_params
from .context import EndUserContext, Identity
from .errors import ConfigError, DeepSecError, IdentityError, TokenAcquisitionError

__all__ = [
    "EXIT_CONFIG",
    "EXIT_OK",
    "EXIT_TOKEN",
    "EXIT_USAGE",
    "Target",
    "UsageError",
    "decode_claims",
    "load_targets",
    "main",
]

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_TOKEN = 2
EXIT_USAGE = 3

#: Claims shown with their values (none of them is a secret).
_SHOWN_CLAIMS = (
    "iss",
    "aud",
    "sub",
    "appid",
    "azp",
    "client_id",
    "tid",
    "scp",
    "scope",
    "roles",
    "preferred_username",
    "upn",
    "name",
)
_USER_CLAIMS = ("preferred_username", "upn", "email", "unique_name", "sub")


class UsageError(Exception):
    """Bad arguments or unreadable input (exit code 3)."""


@dataclass
class Target:
    """One ``end_user_sec_params`` to check and where it came from."""

    where: str
    params: Any
    web_settings: Mapping[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def decode_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, decoded **without** verification (``{}`` if not a JWT)."""
    return _jwt.decode_claims(token) or {}


# -- loading -------------------------------------------------------------------


def _params_from_json(data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise UsageError(f"{where}: expected a JSON object")
    if "extra_auth_params" in data:
        extra = data["extra_auth_params"]
        if not isinstance(extra, Mapping) or "end_user_sec_params" not in extra:
            raise UsageError(f"{where}: extra_auth_params has no end_user_sec_params")
        return extra["end_user_sec_params"]
    if "end_user_sec_params" in data:
        return data["end_user_sec_params"]
    if "spi_type" in data:
        return data
    raise UsageError(
        f"{where}: no end_user_sec_params, extra_auth_params or spi_type key at the top level"
    )


def _load_config_file(path: str) -> list[Target]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc.__class__.__name__})") from None
    params = _params_from_json(data, path)
    web = data.get("DEEPSEC") if isinstance(data, Mapping) else None
    target = Target(path, params, web if isinstance(web, Mapping) else None)
    dsn = data.get("dsn")
    if isinstance(dsn, str) and dsn:
        from .dsn import non_tcps_problem

        problem = non_tcps_problem(dsn, data)
        if problem is not None:
            target.errors.append(f"dsn: {problem}")
    return [target]


def _import_error_cause(exc: BaseException, module_name: str) -> str:
    """Why a settings module failed to import, naming the cause (never a value it read)."""
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    tail = module_name.rpartition(".")[2]
    for frame in reversed(frames):
        if os.path.splitext(os.path.basename(frame.filename))[0] in (tail, "__init__"):
            where = f" (at {os.path.basename(frame.filename)}, line {frame.lineno})"
            break
    if isinstance(exc, KeyError) and exc.args:
        key = exc.args[0]
        return (
            f"KeyError {key!r}{where}: a key the settings read is missing, most likely the "
            f"environment variable {key}; set it (export {key}=...) or read it with "
            "os.environ.get() and a default"
        )
    if isinstance(exc, ModuleNotFoundError):
        return (
            f"ModuleNotFoundError{where}: no module named {exc.name!r}; run from the "
            "project directory (the one holding manage.py) or add it to PYTHONPATH"
        )
    text = str(exc)
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{exc.__class__.__name__}{where}: {text}" if text else exc.__class__.__name__ + where


def _import_settings(module_name: str) -> Any:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(
            f"cannot import settings module {module_name!r}: "
            f"{_import_error_cause(exc, module_name)}"
        ) from None


def _targets_from_settings(module: Any, module_name: str, database: str | None) -> list[Target]:
    databases = getattr(module, "DATABASES", None)
    if not isinstance(databases, Mapping):
        raise UsageError(f"{module_name} has no DATABASES dict")
    if database is not None and database not in databases:
        raise UsageError(f"{module_name}.DATABASES has no alias {database!r}")
    targets = []
    for alias, db in databases.items():
        if database is not None and alias != database:
            continue
        options = db.get("OPTIONS", {}) if isinstance(db, Mapping) else {}
        extra = options.get("extra_auth_params") if isinstance(options, Mapping) else None
        if not isinstance(extra, Mapping) or extra.get("end_user_sec_params") is None:
            if database is not None:
                raise UsageError(
                    f"DATABASES[{alias!r}]['OPTIONS'] has no "
                    "extra_auth_params['end_user_sec_params']"
                )
            continue
        # ENGINE, DSN and DEEPSEC problems are the system checks' job (reported once).
        targets.append(Target(f"DATABASES[{alias!r}]", extra["end_user_sec_params"]))
    if not targets:
        raise UsageError(
            f"no database in {module_name}.DATABASES has "
            "OPTIONS['extra_auth_params']['end_user_sec_params']"
        )
    return targets


def _load_settings(module_name: str, database: str | None) -> list[Target]:
    return _targets_from_settings(_import_settings(module_name), module_name, database)


def load_targets(settings: str | None, config: str | None, database: str | None) -> list[Target]:
    """The configurations named on the command line.

    Raises:
        UsageError: nothing usable to check.
    """
    if bool(settings) == bool(config):
        raise UsageError("give exactly one of --settings MODULE or --config FILE")
    if config:
        return _load_config_file(config)
    assert settings is not None
    return _load_settings(settings, database)


def _parse_identity(value: str | None) -> Identity | None:
    if value is None:
        return None
    from .web import MalformedIdentity, identity_from_cookie

    try:
        return identity_from_cookie(value, max_size=65535)
    except MalformedIdentity as exc:
        raise UsageError(f"--identity: {exc}") from None


# -- reporting --------------------------------------------------------------------


class _Out:
    """Writes report lines, scrubbing every known secret from them."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.secrets: set[str] = set()

    def add_secret(self, value: object) -> None:
        if isinstance(value, str) and len(value) >= 4:
            self.secrets.add(value)
        elif isinstance(value, Mapping):
            for item in value.values():
                self.add_secret(item)

    def __call__(self, text: str = "") -> None:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        self.stream.write(text + "\n")


def _when(exp: Any) -> str:
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        return "no exp claim"
    left = int(exp - time.time())
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(exp))
    state = f"in {left} s" if left > 0 else f"EXPIRED {-left} s ago"
    return f"{stamp} ({state})"


def _user_claim(claims: Mapping[str, Any]) -> str:
    for key in _USER_CLAIMS:
        value = claims.get(key)
        if isinstance(value, str) and value:
            return f"{key}={value}"
    return "none of " + ", ".join(_USER_CLAIMS)


def _claims_lines(claims: Mapping[str, Any]) -> Iterable[str]:
    for key in _SHOWN_CLAIMS:
        if key in claims:
            yield f"      {key}: {json.dumps(claims[key])}"
    hidden = sorted(k for k in claims if k not in _SHOWN_CLAIMS and k not in ("exp", "iat", "nbf"))
    if hidden:
        yield f"      other claims: {', '.join(hidden)}"


def _web_settings_lines(values: Mapping[str, Any], out: _Out) -> int:
    from .web import WebSettings

    resolved: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in values.items():
        name = str(key).lower()
        if name in ("resolver", "data_roles", "attributes") and isinstance(value, str):
            module_name, _, attr = value.rpartition(".")
            try:
                value = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError, ValueError) as exc:
                problems.append(f"{name}: cannot import {value!r} ({exc.__class__.__name__})")
                continue
        resolved[name] = value
    try:
        settings = WebSettings.from_mapping(resolved, where="DEEPSEC")
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        out("  adapter settings (DEEPSEC): INVALID")
        for problem in problems:
            out(f"    - {problem}")
        return EXIT_CONFIG
    out(
        "  adapter settings (DEEPSEC): "
        f"cookie={settings.cookie_name!r}, bearer={settings.bearer}, "
        f"resolver={'set' if settings.resolver else 'none'}, strict={settings.strict}, "
        f"no_identity={settings.no_identity}, token_error_status={settings.token_error_status}"
    )
    return EXIT_OK


def _token_cache_lines(config: EndUserSecConfig, out: _Out) -> int:
    """Check the shared token cache: Redis answers, and a sealed probe round-trips.

    Also prints a key id (a keyed hash, not the key) that must be equal on
    every instance: different ids mean instances that share nothing.  It
    hashes the same material that names the entries (the key and the
    token settings, see ``EndUserSecConfig.token_fingerprint``), so equal ids
    mean shared entries.
    """
    import contextlib
    import urllib.parse
    import uuid

    import redis

    from .config import redact_url
    from .tokens.sealed import Sealer, cache_secret

    url = config.token_cache
    assert url is not None
    with contextlib.suppress(ValueError):
        out.add_secret(urllib.parse.urlsplit(url).password)
    out.add_secret(config.raw.get("token_cache_key"))
    sealer = Sealer(cache_secret(config))
    origin = "token_cache_key" if config.token_cache_key else "derived from the client credential"
    out(f"  token_cache: {redact_url(url)}")
    key_id = sealer.digest("deepsec key id|" + config.token_fingerprint)[:12]
    out(f"    key      : {origin}; key id {key_id} (same on every instance)")
    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    name = "deepsec:probe:v1:" + uuid.uuid4().hex
    try:
        started = time.monotonic()
        client.ping()
        elapsed = (time.monotonic() - started) * 1000
        client.set(name, sealer.seal(name, "probe", time.time() + 60, True), px=10_000)
        opened = sealer.open(name, client.get(name))
        client.delete(name)
        if opened is None or opened.token != "probe":
            raise redis.RedisError("a sealed probe entry did not read back")
    except redis.RedisError as exc:
        out(f"    redis    : FAILED: {type(exc).__name__}: {str(exc)[:200]}")
        out("    (requests still work, but every process asks the identity provider itself)")
        return EXIT_CONFIG
    finally:
        client.close()
    out(f"    redis    : OK (ping {elapsed:.0f} ms; sealed write, read and delete work)")
    return EXIT_OK


def _check(target: Target, identity: Identity | None, out: _Out) -> int:
    out(f"{target.where}:")
    if isinstance(target.params, Mapping):
        out.add_secret(target.params.get("client_credential"))
        out.add_secret(target.params.get("client_secret"))
    try:
        config = parse_end_user_sec_params(target.params)
    except ConfigError as exc:
        out("  end_user_sec_params: INVALID")
        for problem in exc.problems:
            out(f"    - {problem}")
        return EXIT_CONFIG
    for problem in target.problems:
        out(f"  WARNING: {problem}")
    for problem in target.errors:
        out(f"  ERROR: {problem}")
    out(f"  spi_type   : {config.spi_type}")
    out(f"  auth_flow  : {config.auth_flow}")
    if config.authority:
        out(f"  authority  : {config.authority}")
    if config.client_id:
        out(f"  client_id  : {config.client_id}")
    if config.scopes:
        out(f"  scopes     : {' '.join(config.scopes)}")
    code = EXIT_CONFIG if target.errors else EXIT_OK
    if target.web_settings is not None:
        code = max(code, _web_settings_lines(target.web_settings, out))
    if config.token_cache is not None:
        code = max(code, _token_cache_lines(config, out))

    if config.auth_flow == "on_behalf_of" and not isinstance(identity, str):
        out("  identity   : MISSING: auth_flow on_behalf_of needs --identity <user token>")
        return EXIT_USAGE
    try:
        context = EndUserContext(identity)
    except (IdentityError, TypeError) as exc:
        out(f"  identity   : INVALID: {exc}")
        return EXIT_CONFIG
    _identity_lines(context, out)

    from .tokens import token_source_for

    started = time.monotonic()
    try:
        token = token_source_for(config).get_token(context)
    except TokenAcquisitionError as exc:
        out(f"  token      : FAILED: {exc}")
        return EXIT_TOKEN
    except DeepSecError as exc:
        out(f"  token      : FAILED: {exc}")
        return EXIT_CONFIG if isinstance(exc, IdentityError) else EXIT_TOKEN
    except Exception as exc:  # a custom spi module may raise anything
        out(f"  token      : FAILED: {exc.__class__.__name__}: {exc}")
        return EXIT_TOKEN
    out.add_secret(token)
    elapsed = (time.monotonic() - started) * 1000
    claims = decode_claims(token)
    out(f"  token      : acquired in {elapsed:.0f} ms ({len(token)} characters, not shown)")
    out(f"    expires  : {_when(claims.get('exp'))}")
    if claims:
        out("    claims (decoded, NOT verified):")
        for line in _claims_lines(claims):
            out(line)
    else:
        out("    claims   : the token is not a JWT")
    return max(code, _context_lines(config, context, token, out))


def _identity_lines(context: EndUserContext, out: _Out) -> None:
    identity = context.identity
    if identity is None:
        out("  identity   : none (the app's least-privileged context; use --identity)")
    elif isinstance(identity, tuple):
        out.add_secret(identity[1])
        key = "with a key" if identity[1] is not None else "no key"
        out(f"  identity   : local end user {identity[0]!r} ({key})")
    else:
        out.add_secret(identity)
        claims = decode_claims(identity)
        out(f"  identity   : token ({len(identity)} characters, not shown)")
        out(f"    user name claim: {_user_claim(claims)}")
        out(f"    expires  : {_when(claims.get('exp'))}")


def _context_lines(config: EndUserSecConfig, context: EndUserContext, token: str, out: _Out) -> int:
    roles = context.data_roles if context.data_roles is not None else config.data_roles
    attrs = context.attributes if context.attributes is not None else config.attributes
    out("  a connection would carry:")
    if context.identity is None:
        out("    nothing: no end user, so the context is cleared (least privilege)")
        out(f"    (with an end user: data roles {list(roles) if roles else '-'}, ")
        out(f"     attributes {json.dumps(dict(attrs)) if attrs else '-'})")
        return EXIT_OK
    from .hook import build_security_context

    try:
        build_security_context(config, context, token)
    except (IdentityError, TypeError, ValueError) as exc:
        out(f"    INVALID security context: {exc}")
        return EXIT_CONFIG
    kind = "local end user" if context.is_local_user else "end-user token"
    out(f"    identity   : {kind}")
    out(f"    data roles : {', '.join(roles) if roles else '-'}")
    out(f"    attributes : {json.dumps(dict(attrs)) if attrs else '-'}")
    out("    security context: built offline, OK")
    return EXIT_OK


# -- Django system checks -----------------------------------------------------------


def _setup_django(module_name: str) -> str | None:
    """Set Django up from ``module_name`` unless something already did; a problem or None.

    Dotted paths in ``DEEPSEC`` may import models, which needs the app
    registry.  No database is touched: the deepsec checks read settings only.
    """
    import django
    from django.conf import settings

    if settings.configured:
        return None
    os.environ["DJANGO_SETTINGS_MODULE"] = module_name
    try:
        django.setup()
    except Exception as exc:
        return f"django.setup() failed: {_import_error_cause(exc, module_name)}"
    return None


def _django_check_lines(module: Any, module_name: str, out: _Out) -> int:
    """Run deepsec's Django system checks on a settings module (E001-E009, W001).

    The checks run as plain functions of the module's values, so they run
    also when ``deepsec.django`` is missing from ``INSTALLED_APPS`` (then
    ``manage.py check`` would run none of them).
    """
    out(f"Django system checks (deepsec) on {module_name}:")
    try:
        import django  # noqa: F401
    except ImportError:
        out("  skipped: Django is not installed")
        return EXIT_OK
    problem = _setup_django(module_name)
    if problem is not None:
        out(f"  WARNING: {problem}")
    from .django.checks import all_messages

    deepsec_setting = getattr(module, "DEEPSEC", None)
    messages = all_messages(
        installed_apps=getattr(module, "INSTALLED_APPS", None),
        middleware=getattr(module, "MIDDLEWARE", None),
        deepsec=deepsec_setting,
        databases=getattr(module, "DATABASES", None),
    )
    code = EXIT_OK
    for message in messages:
        level = "ERROR" if message.is_serious() else "WARNING"
        if message.is_serious():
            code = EXIT_CONFIG
        out(f"  {message.id} {level}: {message.msg}")
        if message.hint:
            out(f"      fix: {message.hint}")
    if not messages:
        out("  OK: INSTALLED_APPS, MIDDLEWARE, DEEPSEC and DATABASES")
    if isinstance(deepsec_setting, Mapping) and not any(m.id == "deepsec.E004" for m in messages):
        _web_settings_lines(deepsec_setting, out)
    return code


# -- command line ---------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``doctor`` argument parser (argument errors raise :class:`UsageError`)."""
    parser = _Parser(
        prog="python -m deepsec doctor",
        description="Validate end_user_sec_params, acquire a token and show what a "
        "connection would carry. Exit codes: 0 ok, 1 invalid configuration, "
        "2 token acquisition failed, 3 usage error.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--settings", metavar="MODULE", help="Django settings module")
    source.add_argument("--config", metavar="FILE", help="JSON file with end_user_sec_params")
    parser.add_argument("--database", metavar="ALIAS", help="only this DATABASES alias")
    parser.add_argument(
        "--identity",
        metavar="TOKEN_OR_JSON",
        help='end user: an access token, or JSON ["name", null] (use - to read it from stdin)',
    )
    return parser


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    """Run the doctor; returns the exit code."""
    out = _Out(stream or sys.stdout)
    parser = build_parser()
    code = EXIT_OK
    try:
        args = parser.parse_args(argv)
        identity_text = args.identity
        if identity_text == "-":
            identity_text = sys.stdin.readline().strip()
        if identity_text:
            out.add_secret(identity_text)
        identity = _parse_identity(identity_text)
        if args.settings and not args.config:
            module = _import_settings(args.settings)
            _add_settings_secrets(module, out)
            code = _django_check_lines(module, args.settings, out)
            out()
        targets = load_targets(args.settings, args.config, args.database)
    except UsageError as exc:
        out(f"usage error: {exc}")
        out(
            "usage: python -m deepsec doctor (--settings MODULE | --config FILE) "
            "[--database ALIAS] [--identity TOKEN_OR_JSON]"
        )
        return EXIT_USAGE
    for target in targets:
        code = max(code, _check(target, identity, out))
        out()
    out(
        "doctor: "
        + {0: "OK", 1: "INVALID CONFIGURATION", 2: "TOKEN ACQUISITION FAILED", 3: "USAGE ERROR"}[
            code
        ]
    )
    return code


def _add_settings_secrets(module: Any, out: _Out) -> None:
    """Scrub database passwords and client secrets of a settings module from the report."""
    databases = getattr(module, "DATABASES", None)
    for db in databases.values() if isinstance(databases, Mapping) else ():
        if not isinstance(db, Mapping):
            continue
        out.add_secret(db.get("PASSWORD"))
        options = db.get("OPTIONS")
        extra = options.get("extra_auth_params") if isinstance(options, Mapping) else None
        params = extra.get("end_user_sec_params") if isinstance(extra, Mapping) else None
        if isinstance(params, Mapping):
            out.add_secret(params.get("client_credential"))
            out.add_secret(params.get("client_secret"))
