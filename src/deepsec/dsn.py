"""deepsec's one TCPS rule: does a connection carry the end-user context over TLS?

python-oracledb sends an end-user security context only on a TLS
connection; otherwise the first statement with an end user fails with
``DPY-2073`` ("end_user_security_context requires use of the tcps
protocol"), after the app has connected and served anonymous statements.
Every place that checks this calls this module: the connect-time hook
(:func:`require_tcps` on the parsed ``ConnectParams``), the doctor and the
Django system checks (:func:`dsn_tcps_problem` on a connect string).

python-oracledb's own parser reads the connect string, so Easy Connect
strings, descriptors and the ``protocol`` keyword are read exactly as a
connection would read them.  ezTLS (the ``use_eztls=True`` connect
parameter) encrypts a TCP address and is accepted.  Messages name only
protocols, never the connect string (it may hold a host or a password).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    import oracledb

__all__ = [
    "DRIVER_ERROR",
    "TcpsProblem",
    "dsn_protocols",
    "dsn_tcps_problem",
    "params_tcps_problem",
    "protocols_problem",
    "require_tcps",
]

#: python-oracledb's error when a context is set on a connection without TLS.
DRIVER_ERROR = "DPY-2073 (end_user_security_context requires use of the tcps protocol)"
_FIX = (
    "Use a tcps:// Easy Connect string (tcps://host:port/service) or (PROTOCOL=TCPS) in "
    "every ADDRESS of the descriptor, with ssl_context= or a wallet; or the use_eztls=True "
    "connect parameter"
)


@dataclass(frozen=True)
class TcpsProblem:
    """A connect string that does not, or may not, carry the context over TLS.

    ``certain`` is ``False`` when the protocol cannot be determined (a TNS
    alias not resolvable here, an unknown protocol, a ``config-file://``
    or other provider URL): a warning, not an error.
    """

    message: str
    certain: bool


def protocols_problem(protocols: Iterable[str | None], *, use_eztls: bool = False) -> str | None:
    """The rule itself: what is wrong with these address protocols, or ``None``.

    Every address must be TCPS, unless ezTLS encrypts the connection.
    """
    plain = sorted({str(p).lower() for p in protocols if str(p).lower() != "tcps"})
    if not plain or use_eztls:
        return None
    return (
        f"the connect string uses {', '.join(repr(p) for p in plain)}, not TCPS; "
        "python-oracledb sends the "
        "end-user security context only over TLS, so the first statement with an end user "
        f"would fail with {DRIVER_ERROR}. {_FIX}"
    )


def params_tcps_problem(params: oracledb.ConnectParams) -> str | None:
    """:func:`protocols_problem` for parsed ``ConnectParams`` (what a params hook gets)."""
    protocol: Any = params.protocol
    listed = protocol if isinstance(protocol, list) else [protocol]
    return protocols_problem(listed, use_eztls=bool(params.use_eztls))


def require_tcps(params: oracledb.ConnectParams) -> None:
    """Refuse parsed ``ConnectParams`` whose addresses are not all TCPS (nor ezTLS).

    Raises:
        ConfigError: naming the plain protocols (never the connect string).
    """
    problem = params_tcps_problem(params)
    if problem is not None:
        raise ConfigError(problem, where="connection with end_user_sec_params")


def dsn_protocols(dsn: str, options: Mapping[str, Any] | None = None) -> list[str] | None:
    """The protocol of each address of ``dsn`` (lower case), or ``None`` when unknown.

    ``options`` are the other ``oracledb.connect`` keywords (``protocol``,
    ``config_dir``).  A ``user/password@`` prefix is ignored.
    """
    import oracledb

    keywords: dict[str, Any] = {}
    for key in ("protocol", "config_dir"):
        if options and isinstance(options.get(key), str):
            keywords[key] = options[key]
    try:
        params = oracledb.ConnectParams(**keywords)
        connect_string: str | None = dsn
        if "@" in dsn:  # user/password@connect_string, as oracledb.connect(dsn=) takes it
            connect_string = params.parse_dsn_with_credentials(dsn)[2]
        if not connect_string:
            return None
        params.parse_connect_string(connect_string)
    except Exception:  # an alias without tnsnames.ora, an unknown protocol, a provider URL
        return None
    protocol: Any = params.protocol
    found = protocol if isinstance(protocol, list) else [protocol]
    return [str(p).lower() for p in found if p] or None


def dsn_tcps_problem(
    dsn: str, options: Mapping[str, Any] | None = None, *, what: str = "the connect string"
) -> TcpsProblem | None:
    """What is wrong when ``dsn`` (with connect ``options``) may not use TLS, else ``None``.

    ``what`` names the connect string in the "cannot tell" message (e.g.
    ``"DATABASES['default'] NAME"``); the DSN's text is never included.
    """
    protocols = dsn_protocols(dsn, options)
    if protocols is None:
        return TcpsProblem(
            f"cannot tell the protocol of {what} (a TNS alias not resolvable here, "
            "an unsupported protocol or a configuration-provider URL); the end-user "
            f"context needs TCPS, or the first statement with an end user fails with "
            f"{DRIVER_ERROR}",
            certain=False,
        )
    eztls = bool(options) and options.get("use_eztls") is True  # type: ignore[union-attr]
    problem = protocols_problem(protocols, use_eztls=eztls)
    if problem is None:
        return None
    if "use_eztls" in dsn.lower():
        # python-oracledb 26.1 ignores use_eztls inside a connect string.
        problem += (
            "; use_eztls inside the connect string is ignored by python-oracledb: "
            "pass use_eztls=True as a connect parameter (Django: OPTIONS['use_eztls'])"
        )
    return TcpsProblem(problem, certain=True)
