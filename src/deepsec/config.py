"""``end_user_sec_params``: parsed once into a typed, validated object.

The keys are python-oracledb's plugin keys (``spi_type``, ``auth_flow``,
``authority``, ``client_id``, ``client_credential`` / ``client_secret``,
``scopes``, ``data_roles``, ``attributes``) plus a few of our own
(``timeout``, ``ca_file``, ``instance_discovery``, ``max_retries``,
``cache_size``, ``require_end_user``, and the shared token cache's ``token_cache``
and ``token_cache_key``).  Every problem is reported at once in one
:class:`~deepsec.errors.ConfigError`; secrets never appear in ``repr``/``str``
or in error messages.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import importlib
import json
import os
import re
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

from ._validation import validate_attributes, validate_data_roles
from .errors import ConfigError, IdentityError

__all__ = ["BUILTIN_SPI_TYPES", "EndUserSecConfig", "parse_end_user_sec_params"]

AuthFlow = Literal["client_credentials", "on_behalf_of"]
AUTH_FLOWS: tuple[str, ...] = ("client_credentials", "on_behalf_of")
BUILTIN_SPI_TYPES: tuple[str, ...] = ("azure_tokens", "oci_tokens")

_TOKEN_CACHE_KEYS = frozenset({"token_cache", "token_cache_key"})
_COMMON_KEYS = (
    frozenset(
        {"spi_type", "auth_flow", "data_roles", "attributes", "cache_size", "require_end_user"}
    )
    | _TOKEN_CACHE_KEYS
)
_PROVIDER_KEYS = frozenset(
    {
        "authority",
        "client_id",
        "client_credential",
        "client_secret",
        "scopes",
        "timeout",
        "ca_file",
    }
)
_KEYS_BY_SPI: dict[str, frozenset[str]] = {
    "azure_tokens": _COMMON_KEYS | _PROVIDER_KEYS | {"instance_discovery"},
    "oci_tokens": _COMMON_KEYS | _PROVIDER_KEYS | {"max_retries"},
}
_REQUIRED_BY_SPI: dict[str, tuple[str, ...]] = {
    "azure_tokens": ("auth_flow", "authority", "client_id", "client_credential", "scopes"),
    "oci_tokens": ("auth_flow", "authority", "client_id", "client_credential", "scopes"),
}
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_RETRIES = 2
DEFAULT_CACHE_SIZE = 10_000


def _shown(value: object) -> str:
    """How a bad value appears in an error: numbers and flags as is, else its type.

    A misplaced secret (a client secret pasted into ``timeout``) must not be
    echoed, so strings and containers are described, not shown.
    """
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return f"a {type(value).__name__}"


#: Key names shown in errors: plain lowercase names, like every real key.  Any
#: other name (a pasted secret that became a key) is counted, not shown.
_SHOWN_KEY = re.compile(r"[a-z][a-z0-9_]{0,39}")


def _key_names(keys: Sequence[object]) -> str:
    """Unknown key names for an error message, without echoing odd ones."""
    shown = sorted(str(k) for k in keys if isinstance(k, str) and _SHOWN_KEY.fullmatch(k))
    hidden = len(keys) - len(shown)
    if hidden:
        shown.append(f"{hidden} key(s) whose names are not shown")
    return ", ".join(shown)


def _redacted(value: object) -> str:
    return "None" if value is None else "'***'"


@dataclass(frozen=True, eq=False)
class EndUserSecConfig:
    """Validated ``end_user_sec_params``.

    Built by :func:`parse_end_user_sec_params`; not meant to be created by
    hand.  ``client_credential`` is a client secret string or, for Entra ID,
    MSAL's certificate mapping (``{"private_key": ..., "thumbprint": ...}``).
    """

    spi_type: str
    auth_flow: AuthFlow
    authority: str | None
    client_id: str | None
    client_credential: str | Mapping[str, Any] | None = field(repr=False)
    scopes: tuple[str, ...]
    data_roles: tuple[str, ...] | None
    attributes: Mapping[str, Any] | None
    timeout: float
    ca_file: str | None
    instance_discovery: bool
    max_retries: int
    cache_size: int
    #: Strict mode: a statement with no current end user raises NoEndUserError.
    require_end_user: bool = False
    #: For a custom ``spi_type``: the module exposing ``get_database_access_token``.
    module: ModuleType | None = field(repr=False, default=None)
    #: A copy of the dict as given, passed to a custom module's function.
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)
    #: sha256 of the canonical settings (secret included, then hashed): a
    #: cache key that holds no secret.
    fingerprint: str = field(repr=False, default="")
    #: sha256 of the settings that decide which token is issued (see
    #: :func:`_token_fingerprint`): names cache entries, so instances whose
    #: Redis URL, ``timeout`` or ``cache_size`` differ still share tokens.
    token_fingerprint: str = field(repr=False, default="")
    #: The shared (L2) token cache's Redis URL; may hold a password, so it
    #: is shown redacted (:func:`redact_url`).
    token_cache: str | None = field(repr=False, default=None)
    #: The 32-byte key of the shared cache's entries; ``None``: derived.
    token_cache_key: bytes | None = field(repr=False, default=None)

    @property
    def is_builtin(self) -> bool:
        """True for ``azure_tokens`` and ``oci_tokens``."""
        return self.spi_type in BUILTIN_SPI_TYPES

    def raw_params(self) -> dict[str, Any]:
        """A fresh copy of the parameters as given (for custom token modules).

        Without ``token_cache`` and ``token_cache_key``: a token module has no
        use for the Redis password or the cache key, so it is not handed them.
        """
        params = {k: v for k, v in self.raw.items() if k not in _TOKEN_CACHE_KEYS}
        return json.loads(json.dumps(params, default=str))  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return (
            f"EndUserSecConfig(spi_type={self.spi_type!r}, auth_flow={self.auth_flow!r}, "
            f"authority={self.authority!r}, client_id={self.client_id!r}, "
            f"client_credential={_redacted(self.client_credential)}, scopes={self.scopes!r}, "
            f"data_roles={self.data_roles!r}, "
            f"attributes={None if self.attributes is None else sorted(self.attributes)!r}, "
            f"timeout={self.timeout!r}, ca_file={self.ca_file!r}, "
            f"instance_discovery={self.instance_discovery!r}, max_retries={self.max_retries!r}, "
            f"cache_size={self.cache_size!r}, require_end_user={self.require_end_user!r}"
            + (
                ""
                if self.token_cache is None
                else f", token_cache={redact_url(self.token_cache)!r}, "
                f"token_cache_key={_redacted(self.token_cache_key)}"
            )
            + ")"
        )

    __str__ = __repr__


TOKEN_CACHE_SCHEMES: tuple[str, ...] = ("redis", "rediss", "unix")


def redact_url(url: str) -> str:
    """``url`` without its password or query: ``redis://***@host:6379/0``.

    A Redis URL carries its password in the user-info part or in the query
    (``?password=``); neither may reach a log line or a ``repr``.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    auth = "***@" if "@" in parts.netloc else ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{parts.scheme}://{auth}{host}{port}{parts.path}"


#: 32 bytes in URL-safe base64: 43 characters (the last holds 4 bits), then
#: an optional ``=``.
_URLSAFE_KEY = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]=?")


def _parse_token_cache(
    params: Mapping[str, Any], credential: object, problems: list[str]
) -> tuple[str | None, bytes | None]:
    """Validate ``token_cache`` and ``token_cache_key``; never echo either value."""
    url = params.get("token_cache")
    raw_key = params.get("token_cache_key")
    key: bytes | None = None
    if raw_key is not None:
        # Strict: the URL-safe alphabet and the exact length of 32 bytes.  The
        # lenient decoder drops stray characters, so a damaged key (a pasted
        # '+', a quote) silently became another key and the fleet split.
        if isinstance(raw_key, str) and _URLSAFE_KEY.fullmatch(raw_key.strip()):
            key = base64.urlsafe_b64decode(raw_key.strip().rstrip("=") + "=")
        if key is None or len(key) != 32:
            problems.append(
                "token_cache_key must be the URL-safe base64 of 32 random bytes "
                "(python -c 'import secrets,base64; print(base64.urlsafe_b64encode("
                "secrets.token_bytes(32)).decode())')"
            )
            key = None
    if url is None:
        if raw_key is not None:
            problems.append("token_cache_key is set but token_cache (the Redis URL) is not")
        return None, None
    if not isinstance(url, str) or not url.strip():
        problems.append(f"token_cache must be a Redis URL string, got {type(url).__name__}")
        return None, None
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in TOKEN_CACHE_SCHEMES:
        # Show the scheme only when it looks like one: the value may hold a password.
        shown = f" {scheme!r}" if re.fullmatch(r"[a-z][a-z0-9+.-]{0,15}", scheme) else ""
        problems.append(
            f"token_cache must be a redis://, rediss:// or unix:// URL, not a{shown} URL"
            if shown
            else "token_cache must be a redis://, rediss:// or unix:// URL"
        )
        return None, None
    try:
        from redis.connection import parse_url

        parse_url(url)  # type: ignore[no-untyped-call]
    except ImportError:
        problems.append(
            "token_cache needs the redis and cryptography packages "
            "(pip install 'oracledb-deepsec[redis]')"
        )
        return None, None
    except (ValueError, TypeError):
        problems.append(f"token_cache is not a valid {scheme}:// URL")
        return None, None
    if key is None and raw_key is None and not credential:
        problems.append(
            "token_cache needs token_cache_key: there is no client_credential to derive "
            "the shared cache's encryption key from"
        )
    return url, key


def _fingerprint(params: Mapping[str, Any]) -> str:
    canonical = json.dumps(params, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


#: Keys that only tune deepsec itself (never which token is issued): left out
#: of a custom module's token fingerprint.
_DEEPSEC_ONLY_KEYS = _TOKEN_CACHE_KEYS | {"cache_size", "timeout", "require_end_user"}


def _token_fingerprint(
    params: Mapping[str, Any],
    builtin: bool,
    settings: tuple[object, ...],
) -> str:
    """sha256 of what decides the token: the provider settings, not how deepsec runs.

    Built-in sources: ``settings`` (spi_type, auth_flow, authority, client_id,
    credential, scopes).  A custom module may read any key, so its params as
    given, less the keys only deepsec reads.  The Redis URL (password, host
    alias), ``timeout``, ``cache_size`` and ``require_end_user`` are never part of it: instances
    that differ in those still share one fleet cache.
    """
    if builtin:
        material: object = ["builtin", *settings]
    else:
        material = ["module", {k: v for k, v in params.items() if k not in _DEEPSEC_ONLY_KEYS}]
    return _fingerprint({"token": material})


def _load_module(spi_type: str, problems: list[str]) -> ModuleType | None:
    # spi_type is echoed only once it names a module that exists: a secret
    # pasted into it cannot be imported, and is then described, not shown.
    try:
        module = importlib.import_module(spi_type)
    except ImportError as exc:
        problems.append(
            "spi_type is not 'azure_tokens' or 'oci_tokens' and the module it names cannot "
            f"be imported ({exc.__class__.__name__}; the value is not shown)"
        )
        return None
    except Exception as exc:  # a module that fails while importing, a malformed name
        problems.append(
            "spi_type names a module that fails to import "
            f"({exc.__class__.__name__}; the value is not shown)"
        )
        return None
    if not callable(getattr(module, "get_database_access_token", None)):
        problems.append(
            f"spi_type {spi_type!r}: module has no callable "
            "get_database_access_token(end_user_sec_params, identity)"
        )
        return None
    return module


def _check_str(params: Mapping[str, Any], key: str, problems: list[str]) -> str | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{key} must be a non-empty string, got {type(value).__name__}")
        return None
    return value


def _parse(params: Mapping[str, Any]) -> EndUserSecConfig:
    problems: list[str] = []
    if not isinstance(params, Mapping):
        raise ConfigError(f"must be a dict, not {type(params).__name__}")

    spi_type = params.get("spi_type")
    module: ModuleType | None = None
    allowed: frozenset[str] | None
    if not isinstance(spi_type, str) or not spi_type:
        problems.append(
            "spi_type is required: 'azure_tokens', 'oci_tokens' or the dotted path of a module "
            "with get_database_access_token(end_user_sec_params, identity)"
        )
        spi_type = "?"
        allowed = None
    elif spi_type in _KEYS_BY_SPI:
        allowed = _KEYS_BY_SPI[spi_type]
        missing = [k for k in _REQUIRED_BY_SPI[spi_type] if k not in params]
        if "client_credential" in missing and "client_secret" in params:
            missing.remove("client_credential")
        if missing:
            problems.append(f"missing required key(s) for {spi_type}: {', '.join(missing)}")
    else:
        module = _load_module(spi_type, problems)
        extra = getattr(module, "EXTRA_CONFIG_KEYS", ()) if module is not None else ()
        allowed = _COMMON_KEYS | _PROVIDER_KEYS | frozenset(extra)

    if allowed is not None:
        unknown = [k for k in params if k not in allowed]
        if unknown:  # names only, never values
            problems.append(
                f"unknown key(s) for spi_type {spi_type!r}: {_key_names(unknown)} "
                f"(allowed: {', '.join(sorted(allowed))})"
            )

    auth_flow = params.get("auth_flow", "client_credentials")
    if auth_flow not in AUTH_FLOWS:
        # The value is never echoed (a misplaced secret must not show); a near
        # miss is named by the flow it resembles.
        close = (
            difflib.get_close_matches(auth_flow, AUTH_FLOWS, n=1, cutoff=0.75)
            if isinstance(auth_flow, str)
            else []
        )
        problems.append(
            f"auth_flow must be one of {', '.join(AUTH_FLOWS)}, got "
            + (f"a str (did you mean {close[0]!r}?)" if close else _shown(auth_flow))
        )
    elif spi_type == "oci_tokens" and auth_flow != "client_credentials":
        problems.append("auth_flow for spi_type 'oci_tokens' must be 'client_credentials'")

    authority = _check_str(params, "authority", problems)
    is_https = authority is not None and authority.lower().startswith("https://")
    if authority is not None and spi_type in BUILTIN_SPI_TYPES and not is_https:
        problems.append("authority must be an https:// URL")
    client_id = _check_str(params, "client_id", problems)

    credential: str | Mapping[str, Any] | None = None
    if "client_credential" in params and "client_secret" in params:
        problems.append("give client_credential or its alias client_secret, not both")
    raw_cred = params.get("client_credential", params.get("client_secret"))
    cred_key = "client_credential" if "client_credential" in params else "client_secret"
    if raw_cred is not None:
        if isinstance(raw_cred, str) and raw_cred:
            credential = raw_cred
        elif isinstance(raw_cred, Mapping) and spi_type != "oci_tokens":
            if not {"private_key", "thumbprint"} <= set(raw_cred):
                problems.append(
                    f"{cred_key} as a certificate must have 'private_key' and 'thumbprint'"
                )
            else:
                credential = raw_cred
        else:
            # Never echo the value: it is a secret.
            problems.append(
                f"{cred_key} must be a non-empty string"
                + (" or a certificate mapping" if spi_type != "oci_tokens" else "")
                + f", got {type(raw_cred).__name__}"
            )

    scopes: tuple[str, ...] = ()
    raw_scopes = params.get("scopes")
    if raw_scopes is not None:
        if isinstance(raw_scopes, str) and raw_scopes.strip():
            scopes = tuple(raw_scopes.split())
        elif (
            isinstance(raw_scopes, (list, tuple))
            and raw_scopes
            and all(isinstance(s, str) and s.strip() for s in raw_scopes)
        ):
            scopes = tuple(raw_scopes)
        else:
            problems.append("scopes must be a non-empty string or a list of non-empty strings")

    data_roles = attributes = None
    try:
        data_roles = validate_data_roles(params.get("data_roles"))
    except (TypeError, IdentityError) as exc:
        problems.append(str(exc))
    try:
        attributes = validate_attributes(params.get("attributes"))
    except (TypeError, IdentityError):
        # Our own words: the validator's message quotes the attribute's name.
        problems.append(
            "attributes must be a dict of non-empty string names to JSON-compatible values"
        )

    timeout = params.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        problems.append(f"timeout must be a positive number of seconds, got {_shown(timeout)}")
        timeout = DEFAULT_TIMEOUT

    ca_file = params.get("ca_file")
    if ca_file is not None and (not isinstance(ca_file, str) or not os.path.isfile(ca_file)):
        problems.append(
            "ca_file must be the path of a readable PEM file"
            + (
                # Not echoed: a secret pasted here must not show in the error.
                ", and the path given is not a readable file (the value is not shown)"
                if isinstance(ca_file, str)
                else f", got {_shown(ca_file)}"
            )
        )
        ca_file = None

    instance_discovery = params.get("instance_discovery", True)
    if not isinstance(instance_discovery, bool):
        problems.append(
            f"instance_discovery must be true or false, got {_shown(instance_discovery)}"
        )
        instance_discovery = True

    max_retries = params.get("max_retries", DEFAULT_MAX_RETRIES)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        problems.append(f"max_retries must be an integer >= 0, got {_shown(max_retries)}")
        max_retries = DEFAULT_MAX_RETRIES

    cache_size = params.get("cache_size", DEFAULT_CACHE_SIZE)
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
        problems.append(f"cache_size must be an integer >= 1, got {_shown(cache_size)}")
        cache_size = DEFAULT_CACHE_SIZE

    require_end_user = params.get("require_end_user", False)
    if not isinstance(require_end_user, bool):
        problems.append(f"require_end_user must be true or false, got {_shown(require_end_user)}")
        require_end_user = False

    token_cache, token_cache_key = _parse_token_cache(params, credential, problems)

    if problems:
        raise ConfigError(problems)
    return EndUserSecConfig(
        spi_type=spi_type,
        auth_flow=auth_flow,
        authority=authority,
        client_id=client_id,
        client_credential=credential,
        scopes=scopes,
        data_roles=data_roles,
        attributes=attributes,
        timeout=float(timeout),
        ca_file=ca_file,
        instance_discovery=instance_discovery,
        max_retries=max_retries,
        cache_size=cache_size,
        require_end_user=require_end_user,
        module=module,
        raw=dict(params),
        fingerprint=_fingerprint(params),
        token_fingerprint=_token_fingerprint(
            params,
            spi_type in BUILTIN_SPI_TYPES,
            (spi_type, auth_flow, authority, client_id, credential, list(scopes)),
        ),
        token_cache=token_cache,
        token_cache_key=token_cache_key,
    )


_parsed: dict[str, EndUserSecConfig] = {}
_parsed_lock = threading.Lock()


def parse_end_user_sec_params(params: Mapping[str, Any]) -> EndUserSecConfig:
    """Validate ``end_user_sec_params`` and return the typed config.

    Equal dicts return the same object, so a pool or an app that connects
    many times parses once and shares one token source.

    Raises:
        ConfigError: listing every problem found.
    """
    if not isinstance(params, Mapping):
        raise ConfigError(f"must be a dict, not {type(params).__name__}")
    key = _fingerprint(params)
    config = _parsed.get(key)
    if config is None:
        config = _parse(params)
        with _parsed_lock:
            config = _parsed.setdefault(key, config)
    return config
