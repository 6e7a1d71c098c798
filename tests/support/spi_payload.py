"""A custom ``spi_type`` module for tests: returns a JWT whose payload is given verbatim.

``end_user_sec_params["payload"]`` is the JSON text of the token's payload,
so tests can hand the cache an ``exp`` of ``NaN``, ``Infinity``, ``1e400``...
"""

from __future__ import annotations

import base64
from typing import Any

EXTRA_CONFIG_KEYS = frozenset({"payload"})


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def get_database_access_token(end_user_sec_params: dict[str, Any], identity: Any) -> str:
    payload = str(end_user_sec_params["payload"]).encode()
    header = _b64(b'{"alg": "none"}')
    return header + "." + _b64(payload) + ".sig"
