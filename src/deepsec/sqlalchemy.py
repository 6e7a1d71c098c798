"""SQLAlchemy: ``oracle+oracledb`` engines run every statement as the current end user.

Nothing SQLAlchemy-specific is needed at run time.  SQLAlchemy's
``oracle+oracledb`` and ``oracle+oracledb_async`` dialects call
``oracledb.connect`` with the engine's ``connect_args``; deepsec's params hook
sees ``extra_auth_params["end_user_sec_params"]`` there and installs its
per-round-trip callback on each new DBAPI connection.  Before every round trip
— including on connections SQLAlchemy's ``QueuePool`` /
``AsyncAdaptedQueuePool`` hands out again and again to different users — the
callback attaches the current end user's context, switches it when the user
changed, or clears it when there is no end user.  So pooled connections never
carry a previous user's identity, and nothing runs as an end user outside a
``deepsec.end_user`` block or a web request::

    import deepsec
    import sqlalchemy as sa
    from deepsec.sqlalchemy import connect_args

    engine = sa.create_engine(
        "oracle+oracledb://app_user:password@",
        connect_args=connect_args(
            {"spi_type": "azure_tokens", ...},  # end_user_sec_params
            dsn="tcps://db.example.com:1522/sales",
        ),
    )
    with deepsec.end_user(token), engine.connect() as conn:
        conn.execute(sa.text("select ... from orders"))  # runs as the token's user

Asyncio (``create_async_engine("oracle+oracledb_async://...")``): scope work
with ``async with deepsec.end_user(...)`` (or run under the ASGI/FastAPI
adapter), which fetches the database-access token off the event loop first;
the per-round-trip callback never does network I/O on the loop and raises
:class:`~deepsec.TokenNotReadyError` if a token was not fetched.

:func:`connect_args` is a convenience only: it validates
``end_user_sec_params`` when the engine is configured (instead of at the first
connect) and merges them into any ``extra_auth_params`` you pass.  Writing
``connect_args={"extra_auth_params": {"end_user_sec_params": {...}}, ...}``
by hand is equivalent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import parse_end_user_sec_params
from .errors import ConfigError

__all__ = ["connect_args"]


def connect_args(
    end_user_sec_params: Mapping[str, Any],
    *,
    extra_auth_params: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``connect_args`` for ``create_engine`` / ``create_async_engine``.

    Args:
        end_user_sec_params: the python-oracledb plugin's parameters
            (``spi_type``, ``auth_flow``, ``authority``, ``client_id``,
            ``client_credential``, ``scopes``...), validated now.
        extra_auth_params: other ``extra_auth_params`` to keep (they must not
            contain ``end_user_sec_params`` already).
        **kwargs: any other ``oracledb.connect`` keyword (``dsn``,
            ``ssl_context``, ``wallet_location``...), passed through.

    Returns:
        A new dict to give as ``connect_args=``.

    Raises:
        ConfigError: the parameters are invalid (every problem listed, no secret).
    """
    parse_end_user_sec_params(end_user_sec_params)
    extra = dict(extra_auth_params or {})
    if "end_user_sec_params" in extra:
        raise ConfigError(
            "give end_user_sec_params once, not also inside extra_auth_params",
            where="deepsec.sqlalchemy.connect_args",
        )
    extra["end_user_sec_params"] = dict(end_user_sec_params)
    return {**kwargs, "extra_auth_params": extra}
