"""The doctor's report: the checks of one configuration, printed without secrets.

:class:`Out` scrubs every secret it was told about from each line;
:func:`check_target` validates one ``end_user_sec_params``, acquires a token
and builds the end-user security context offline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from .. import _jwt
from ..config import EndUserSecConfig, parse_end_user_sec_params
from ..context import EndUserContext, Identity
from ..errors import ConfigError, DeepSecError, IdentityError, TokenAcquisitionError

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_TOKEN = 2
EXIT_USAGE = 3

#: Keys of ``end_user_sec_params`` whose values are secrets (scrubbed from the report).
SECRET_PARAM_KEYS = ("client_credential", "client_secret")

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


# -- reporting --------------------------------------------------------------------


class Out:
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


def web_settings_lines(values: object, out: Out) -> int:
    """Report ``DEEPSEC`` as the adapter reads it (:func:`deepsec.django.conf.parse_settings`)."""
    try:
        from ..django.conf import parse_settings
    except ImportError:  # DEEPSEC is the Django setting; its parser needs Django
        out("  adapter settings (DEEPSEC): not checked (Django is not installed)")
        return EXIT_OK
    try:
        settings = parse_settings(values)
    except ConfigError as exc:
        out("  adapter settings (DEEPSEC): INVALID")
        for problem in exc.problems:
            out(f"    - {problem}")
        return EXIT_CONFIG
    out(
        "  adapter settings (DEEPSEC): "
        f"cookie={settings.cookie_name!r}, bearer={settings.bearer}, "
        f"resolver={'set' if settings.resolver else 'none'}, strict={settings.strict}, "
        f"no_identity={settings.no_identity}, token_error_status={settings.token_error_status}"
    )
    return EXIT_OK


def _token_cache_lines(config: EndUserSecConfig, out: Out) -> int:
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

    from ..config import redact_url
    from ..tokens.sealed import Sealer, cache_secret

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


def check_target(target: Target, identity: Identity | None, out: Out) -> int:
    out(f"{target.where}:")
    if isinstance(target.params, Mapping):
        for key in SECRET_PARAM_KEYS:
            out.add_secret(target.params.get(key))
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
        code = max(code, web_settings_lines(target.web_settings, out))
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

    from ..tokens import token_source_for

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


def _identity_lines(context: EndUserContext, out: Out) -> None:
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


def _context_lines(config: EndUserSecConfig, context: EndUserContext, token: str, out: Out) -> int:
    roles = context.data_roles if context.data_roles is not None else config.data_roles
    attrs = context.attributes if context.attributes is not None else config.attributes
    out("  a connection would carry:")
    if context.identity is None:
        out("    nothing: no end user, so the context is cleared (least privilege)")
        out(f"    (with an end user: data roles {list(roles) if roles else '-'}, ")
        out(f"     attributes {json.dumps(dict(attrs)) if attrs else '-'})")
        return EXIT_OK
    from ..hook import build_security_context

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
