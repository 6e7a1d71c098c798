"""A small Django project for deepsec's Django adapter tests.

Its DATABASES are filled in at run time (:func:`configure_databases`) from the
session's Oracle wire test server: the DSN and TLS context exist only then.
"""

from __future__ import annotations

from typing import Any

#: The end_user_sec_params of every test database: the tests' custom spi_type.
END_USER_SEC_PARAMS: dict[str, Any] = {"spi_type": "spi_static", "client_id": "django-app"}
#: Database aliases: a new connection per request, persistent connections, a pool.
ALIASES = ("default", "persistent", "pooled")


def database_settings(dsn: str, ssl_context: Any, user: str, password: str) -> dict[str, Any]:
    """DATABASES for the three connection strategies, all through Django's Oracle backend."""

    def db(conn_max_age: int, **options: Any) -> dict[str, Any]:
        return {
            "ENGINE": "django.db.backends.oracle",
            # NAME may be a full Easy Connect string; HOST and PORT stay empty.
            "NAME": dsn,
            "USER": user,
            "PASSWORD": password,
            "CONN_MAX_AGE": conn_max_age,
            "OPTIONS": {
                "ssl_context": ssl_context,
                "extra_auth_params": {"end_user_sec_params": dict(END_USER_SEC_PARAMS)},
                **options,
            },
        }

    return {
        "default": db(0),
        "persistent": db(600),
        "pooled": db(0, pool={"min": 0, "max": 8, "increment": 1}),
    }
