"""A custom ``spi_type`` module for tests: the documented extension point.

``get_database_access_token(end_user_sec_params, identity)`` returns an
unsigned JWT-shaped database-access token whose ``sub`` names the app (from
``client_id``) and, for token identities, carries nothing of the user: the
database learns the end user from the context's identity.  ``CALLS`` counts
calls so tests can check caching; ``FAIL`` makes the next calls raise.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

CALLS: list[str] = []
FAIL: list[BaseException] = []
_lock = threading.Lock()
EXTRA_CONFIG_KEYS = frozenset({"lifetime"})


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def make_jwt(claims: dict[str, Any]) -> str:
    """An unsigned JWT-shaped string (header.payload.signature)."""
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.sig"


def get_database_access_token(end_user_sec_params: dict[str, Any], identity: Any) -> str:
    with _lock:
        CALLS.append(end_user_sec_params.get("client_id", "app"))
        if FAIL:
            raise FAIL[0]
    lifetime = int(end_user_sec_params.get("lifetime", 3600))
    now = int(time.time())
    return make_jwt(
        {
            "sub": end_user_sec_params.get("client_id", "app"),
            "preferred_username": end_user_sec_params.get("client_id", "app"),
            "iat": now,
            "exp": now + lifetime,
            "n": len(CALLS),
        }
    )


def reset() -> None:
    with _lock:
        CALLS.clear()
        FAIL.clear()
