"""Does a connect string reach the database over TCPS?

The end-user security context travels only on TCPS connections: over plain
TCP the database resets the connection (``DPY-4011``) without saying why.
The doctor and the Django system checks use :func:`non_tcps_problem` to say
so before the first request does.  python-oracledb's own parser decides, so
Easy Connect strings, descriptors and the ``protocol`` keyword are read
exactly as a connection would read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["dsn_protocols", "non_tcps_problem"]


def dsn_protocols(dsn: str, options: Mapping[str, Any] | None = None) -> list[str] | None:
    """The protocol of each address of ``dsn`` (lower case), or ``None`` when unknown.

    ``options`` are the other ``oracledb.connect`` keywords (``protocol``,
    ``config_dir``).  A TNS alias that cannot be resolved here is unknown.
    """
    import oracledb

    keywords: dict[str, Any] = {}
    for key in ("protocol", "config_dir"):
        if options and isinstance(options.get(key), str):
            keywords[key] = options[key]
    try:
        params = oracledb.ConnectParams(**keywords)
        params.parse_connect_string(dsn)
    except Exception:  # an alias without tnsnames.ora, a malformed string: unknown
        return None
    if getattr(params, "use_eztls", False) or (options and options.get("use_eztls") is True):
        return ["tcps"]  # ezTLS encrypts a TCP address: the context may travel on it
    protocol: Any = params.protocol
    found = protocol if isinstance(protocol, list) else [protocol]
    return [str(p).lower() for p in found if p]


def non_tcps_problem(dsn: str, options: Mapping[str, Any] | None = None) -> str | None:
    """What is wrong when ``dsn`` does not use TCPS for every address, else ``None``.

    The message never includes the DSN's text (it may hold a password).
    """
    protocols = dsn_protocols(dsn, options)
    if protocols is None or all(p == "tcps" for p in protocols):
        return None
    plain = sorted({p for p in protocols if p != "tcps"})
    return (
        f"the connect string uses {', '.join(plain)}, not TCPS; the end-user security "
        "context travels only over TCPS, so the database would reset the connection "
        "(DPY-4011). Use a tcps:// Easy Connect string (tcps://host:port/service) or "
        "(PROTOCOL=TCPS) in every ADDRESS of the descriptor"
    )
