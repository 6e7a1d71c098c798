"""What the server records: end-user contexts, round trips, connections (public, read-only)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ... import _jwt
from .codec import _FUNC_EXECUTE, _FUNC_REEXECUTE, _FUNC_REEXECUTE_AND_FETCH, Value

# ---------------------------------------------------------------------------
# Recorded objects
# ---------------------------------------------------------------------------


def decode_jwt_claims(token: str | None) -> dict[str, Value]:
    """The claims of a JWT's payload, decoded **without** any verification.

    Returns an empty dict for ``None`` or anything that is not a JWT with a
    JSON object payload (:func:`deepsec._jwt.decode_claims`).
    """
    return _jwt.decode_claims(token) or {}


_COMMENT_OR_STRING = re.compile(r"'(?:[^']|'')*'|/\*.*?(?:\*/|\Z)|--[^\n]*", re.S)


def statement_has_tag(sql: str | None, tag: str) -> bool:
    """Whether ``tag`` is a word inside an SQL comment anywhere in ``sql``.

    Finds ``/* t1 */`` at the start, middle or end of a statement, ``-- t1``,
    ``/* app=hr t1 */`` and also ``/* t1 *``: Django's Oracle backend strips a
    statement's trailing ``/`` (or ``;``), which breaks a tag at the very end.
    Text in string literals is not a comment.  ``tag`` is matched whole
    (``t1`` does not match ``t10``).
    """
    if not sql or not tag:
        return False
    word = re.compile(r"(?<![\w-])" + re.escape(tag) + r"(?![\w-])")
    for match in _COMMENT_OR_STRING.finditer(sql):
        token = match.group(0)
        if not token.startswith("'") and word.search(token[2:]):
            return True
    return False


def _identity_from_claims(claims: Mapping[str, Value]) -> str | None:
    for key in ("preferred_username", "sub"):
        value = claims.get(key)
        if isinstance(value, str) and value:
            return value
    return None


@dataclass(frozen=True)
class WireContext:
    """The end-user security context that travelled with one round trip.

    Decoded from the ``ORCL_XS_AUTHZ_CONTEXT`` OSON document of the 0xcd
    piggyback.  Token values are kept (tests may compare them) but left out of
    ``repr``.

    Attributes:
        end_user_token: the end user's token (``end_user_token``), if any.
        end_user_name: the local end-user name (``end_user_name``), if any.
        end_user_contextid: the key of a local end-user identity.
        database_access_token: the application's database access token.
        data_roles: the ``data_roles`` list (``None`` when absent).
        attributes: ``attributes`` as a read-only ``{name: values}`` mapping.
        version: the document's ``ver``.
        document: the whole decoded document (read-only).
    """

    end_user_token: str | None = field(default=None, repr=False)
    end_user_name: str | None = None
    end_user_contextid: str | None = None
    database_access_token: str | None = field(default=None, repr=False)
    data_roles: tuple[str, ...] | None = None
    attributes: Mapping[str, Value] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    version: str | None = None
    document: Mapping[str, Value] = field(
        default_factory=lambda: MappingProxyType({}), hash=False, repr=False, compare=False
    )

    @classmethod
    def from_document(cls, doc: Mapping[str, Value]) -> WireContext:
        """Build a context from the decoded OSON document."""

        def text(key: str) -> str | None:
            value = doc.get(key)
            return value if isinstance(value, str) else None

        roles = doc.get("data_roles")
        attrs: dict[str, Value] = {}
        raw_attrs = doc.get("attributes")
        if isinstance(raw_attrs, list):
            for item in raw_attrs:
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    attrs[item["name"]] = item.get("values")
        return cls(
            end_user_token=text("end_user_token"),
            end_user_name=text("end_user_name"),
            end_user_contextid=text("end_user_contextid"),
            database_access_token=text("database_access_token"),
            data_roles=tuple(str(r) for r in roles) if isinstance(roles, list) else None,
            attributes=MappingProxyType(attrs),
            version=text("ver"),
            document=MappingProxyType(dict(doc)),
        )

    @property
    def end_user_claims(self) -> dict[str, Value]:
        """Unverified claims of :attr:`end_user_token` (``{}`` if none)."""
        return decode_jwt_claims(self.end_user_token)

    @property
    def database_access_claims(self) -> dict[str, Value]:
        """Unverified claims of :attr:`database_access_token` (``{}`` if none)."""
        return decode_jwt_claims(self.database_access_token)

    @property
    def username(self) -> str | None:
        """The end user's name as ``xs_sys_context('xs$session','username')`` answers it.

        The end-user token's ``preferred_username`` claim, else its ``sub``;
        else :attr:`end_user_name`; else (on-behalf-of style context with only
        a database access token) that token's ``preferred_username``/``sub``.
        """
        if self.end_user_token is not None:
            return _identity_from_claims(self.end_user_claims)
        if self.end_user_name is not None:
            return self.end_user_name
        if self.database_access_token is not None:
            return _identity_from_claims(self.database_access_claims)
        return None

    @property
    def kind(self) -> Literal["token", "local", "database_access_token", "empty"]:
        """Which identity form the context carries."""
        if self.end_user_token is not None:
            return "token"
        if self.end_user_name is not None:
            return "local"
        if self.database_access_token is not None:
            return "database_access_token"
        return "empty"


@dataclass(frozen=True)
class RoundTrip:
    """One client request and the server's answer.

    Attributes:
        index: global position in the server's record (monotonic, never reused).
        conn_id: the connection (equals the driver's ``connection.session_id``).
        seq: 1-based position among this connection's recorded round trips.
        function: function name (``"execute"``, ``"reexecute_and_fetch"``,
            ``"fetch"``, ``"ping"``, ``"commit"``, ``"auth_phase_two"``, ...).
        function_code: the TTC function code.
        sql: full SQL text (comments kept) for execute/re-execute/fetch.
        binds: bind values of the first (usually only) execution, in wire order.
        bind_rows: bind values of every execution (``executemany``).
        context: the end-user context that came with this round trip, or None.
        piggybacks: TTC codes of every piggyback that preceded the function.
        cursor_id: the server cursor the round trip used (0 if none).
        error: the ORA error number answered (None on success; ORA-01403 that
            ends a fetch is not counted as an error).
        rows: number of rows returned by this round trip.
    """

    index: int
    conn_id: int
    seq: int
    function: str
    function_code: int
    sql: str | None
    binds: tuple[Value, ...]
    bind_rows: tuple[tuple[Value, ...], ...]
    context: WireContext | None
    piggybacks: tuple[int, ...]
    cursor_id: int
    error: int | None
    rows: int

    @property
    def is_statement(self) -> bool:
        """True for round trips that execute SQL (execute and re-executes)."""
        return self.function_code in (_FUNC_EXECUTE, _FUNC_REEXECUTE, _FUNC_REEXECUTE_AND_FETCH)


@dataclass(frozen=True)
class ConnectionRecord:
    """A snapshot of one client connection.

    Attributes:
        conn_id: server-side id (also the session id reported to the driver).
        peer: client address.
        user: the login (schema) user, upper case; None before login.
        method: ``"password"`` or ``"token"``; None before login.
        access_token: the token of a token login (left out of ``repr``).
        logged_in: whether authentication succeeded.
        closed: whether the connection has ended.
        pop_header: for a proof-of-possession token login (``access_token``
            given as ``(token, private_key)``, as OCI database tokens are),
            the signed ``AUTH_HEADER`` text (``date``, ``(request-target)``,
            ``host`` lines); None otherwise.
        pop_signature: the base64 RSA-SHA256 signature of :attr:`pop_header`
            the driver made with the private key (``AUTH_SIGNATURE``).
    """

    conn_id: int
    peer: tuple[str, int]
    user: str | None
    method: Literal["password", "token"] | None
    access_token: str | None = field(repr=False)
    logged_in: bool
    closed: bool
    pop_header: str | None = None
    pop_signature: str | None = field(default=None, repr=False)

    @property
    def access_token_claims(self) -> dict[str, Value]:
        """Unverified claims of the login access token."""
        return decode_jwt_claims(self.access_token)

    def verify_proof_of_possession(self, public_key: str | bytes) -> bool:
        """Whether :attr:`pop_signature` is a valid signature of :attr:`pop_header`.

        Args:
            public_key: the PEM public key the token is bound to (for an OCI
                database token, the one sent to ``generateScopedAccessToken``).
        """
        if self.pop_header is None or self.pop_signature is None:
            return False
        pem = public_key.encode() if isinstance(public_key, str) else public_key
        try:
            key = serialization.load_pem_public_key(pem)
            if not isinstance(key, rsa.RSAPublicKey):
                return False
            key.verify(
                base64.b64decode(self.pop_signature),
                self.pop_header.encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (InvalidSignature, ValueError, binascii.Error):
            return False
        return True
